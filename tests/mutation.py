"""`make mutate`: mutation testing of the core modules with mutmut (configured in setup.cfg).

    python tests/mutation.py            # run, then report
    python tests/mutation.py --report   # report the last run only
    python tests/mutation.py --recheck-listed   # also re-run the listed survivors (before a release)
    rm -rf mutants                      # forget every cached result (a clean run: 19 min on 2 cores)

Every surviving mutant must be killed by a test or listed in tests/MUTANTS.md (its mutmut name in
backticks, with the reason it is equivalent or out of reach). Exits 1 when a survivor is neither.
Not part of `make test`: run it before resolving an issue that touches the modules in setup.cfg.
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "tests" / "MUTANTS.md"
# Functions mutated in the modules setup.cfg names (a module's argument parsing and messages are
# not core logic): mutmut names are module.x_function or module.xǁClassǁmethod.
SCOPE = [
    "megamoe.model.moe.*",
    "megamoe.model.dispatch.*",
    "megamoe.model.attention.*",
    "megamoe.kernels.reference.*",
    "megamoe.data.indexed.*",
    "megamoe.data.dataset.*",
    "megamoe.hf.*",
    "megamoe.parallel.expert.x_native_expert_state_dict*",
    "megamoe.parallel.expert.x_autoep_expert_state_dict*",
    "megamoe.parallel.expert.x__is_experts*",
    "megamoe.parallel.expert.x_recomputing_experts*",
    "megamoe.parallel.expert.xǁExpertParallelRouterǁ*",
    "megamoe.guard.*",
]


def mutmut(*args: str) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    r = subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"mutmut {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def run_mutmut(*names: str) -> None:
    exe = str(Path(sys.executable).with_name("mutmut"))
    r = subprocess.run([exe, "run", *names], cwd=ROOT, stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit(f"mutmut run failed ({r.returncode})")


def results() -> dict[str, str]:
    """{mutant name: status} for the mutants in SCOPE."""
    status = {}
    for line in mutmut("results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m and in_scope(m[1]):
            status[m[1]] = m[2].strip()
    return status


def in_scope(name: str) -> bool:
    import fnmatch
    return any(fnmatch.fnmatchcase(name, pat) for pat in SCOPE)


def ledger_names() -> set[str]:
    """The mutants tests/MUTANTS.md explains (their names in backticks)."""
    return set(re.findall(r"`([\w.ǁ]+__mutmut_\d+)`", LEDGER.read_text(encoding="utf-8"))) if LEDGER.exists() else set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="only report the last run")
    ap.add_argument("--recheck-listed", action="store_true",
                    help="also re-run the earlier survivors tests/MUTANTS.md lists (finds entries a new test "
                         "now kills; each survivor runs every test that covers it, so this takes minutes)")
    args = ap.parse_args()
    listed = ledger_names()
    if not args.report:
        t0 = time.time()
        # mutmut keeps each mutant's result until its function changes: new and changed mutants run
        # here; then the survivors of EARLIER runs (cached, so not run against today's tests) run
        # again by name: those not yet explained, or all with --recheck-listed. A listed survivor in
        # an unchanged function stays a survivor unless a new test kills it, which only makes its
        # ledger entry stale. A clean run (no mutants/ yet) has nothing cached to re-run.
        before = {n for n, s in results().items()
                  if s not in ("killed", "timeout") and (args.recheck_listed or n not in listed)} \
            if (ROOT / "mutants").exists() else set()
        run_mutmut()
        again = [n for n, s in results().items() if s not in ("killed", "timeout") and n in before]
        if again:
            run_mutmut(*again)
        print(f"mutmut: {time.time() - t0:.0f} s ({len(again)} earlier survivors re-run)")
    status = results()
    counts = collections.Counter(status.values())
    survivors = sorted(n for n, s in status.items() if s == "survived")
    unexplained = [n for n in survivors if n not in listed]
    # a listed name that is no longer a survivor: killed now, or gone (its function changed, so
    # mutmut numbered its mutants afresh and the entry may now name a different change)
    stale = sorted(n for n in listed if in_scope(n) and status.get(n) != "survived")
    print(f"mutants tried {len(status)}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    print(f"surviving {len(survivors)}: {len(survivors) - len(unexplained)} listed in tests/MUTANTS.md, "
          f"{len(unexplained)} not listed")
    for n in unexplained:
        print(f"  survived, not in MUTANTS.md: {n}   (mutmut show {n})")
    for n in stale:
        print(f"  listed in MUTANTS.md but now {status.get(n, 'no such mutant')}: {n} (remove it from the ledger)")
    # a timeout is a caught mutant too (it made a test hang: mutmut's own score counts it so)
    other = sorted(n for n, s in status.items() if s not in ("killed", "survived", "timeout"))
    for n in other:
        print(f"  {status[n]}: {n}")
    return 1 if unexplained or other else 0


if __name__ == "__main__":
    sys.exit(main())
