"""Tokenizer export, HF -> megamoe import, evaluation and generation (single process, no DeepSpeed)."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megamoe.config import ModelConfig
from megamoe.checkpoint import CheckpointError, load_native_state_dict
from megamoe.export import convert_from_hf, convert_to_hf
from megamoe.hf import save_hf_dir

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n  Indented  line, 12345.\n") * 20


def _mistral_model() -> str:
    spec = importlib.util.find_spec("mistral_common")   # data file only; never imported
    if spec is None:
        pytest.fail("mistral-common (its sentencepiece model) is not installed; see requirements-data.txt")
    return str(Path(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1"))


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    from megamoe.data.tokenizer import train_sentencepiece
    return str(train_sentencepiece([TEXT], tmp_path_factory.mktemp("sp"), vocab_size=300, num_threads=1))


@pytest.mark.parametrize("which", ["ours", "mistral"])
def test_sentencepiece_export_same_ids_offline(which, sp_file, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    from megamoe.tokenizer_export import export_tokenizer
    path = sp_file if which == "ours" else _mistral_model()
    export_tokenizer(path, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=path)
    for text in [TEXT, "a  b   c", " leading", "x\n\n  y\t z", "Zürich 東京 🙂"]:
        assert hf(text)["input_ids"] == sp.encode(text), text
    assert hf.eos_token_id == sp.eos_id() and hf.decode(sp.encode(TEXT)) == sp.decode(sp.encode(TEXT))


def test_tiktoken_refused(tmp_path):
    import base64
    from megamoe.tokenizer_export import TokenizerExportError, export_tokenizer
    f = tmp_path / "toy.tiktoken"
    f.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    with pytest.warns(UserWarning):
        with pytest.raises(TokenizerExportError, match="tiktoken"):
            export_tokenizer(f, tmp_path / "out")


@pytest.fixture(scope="module")
def small(tmp_path_factory, sp_file):
    """An HF directory of a random tiny model (with tokenizer) and its megamoe import."""
    from megamoe.tokenizer_export import export_tokenizer
    cfg = ModelConfig.load("tiny", vocab_size=320)
    model = cfg.build(seed=3)
    with torch.no_grad():
        for _, r in model.routers():
            r.e_score_correction_bias.normal_(0, 0.05)
    base = tmp_path_factory.mktemp("small")
    hf_dir = base / "hf"
    save_hf_dir(hf_dir, cfg, model.state_dict())
    export_tokenizer(sp_file, hf_dir, cfg)
    ck = convert_from_hf(hf_dir, base / "megamoe")
    return cfg, model, hf_dir, ck


def test_convert_from_hf_weights_only_checkpoint(small):
    cfg, model, hf_dir, ck = small
    assert (ck / "latest").read_text().strip() == "global_step0"
    sd, info = load_native_state_dict(ck)
    # HF configs carry no training-side knobs (aux/z-loss coefficients, bias update rate)
    training_only = {"aux_loss_alpha", "router_z_loss_coef", "bias_update_rate"}
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in training_only}  # noqa: E731
    assert info.weights_only and strip(info.config) == strip(cfg) and info.state.step == 0
    ref = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert Path(info.tokenizer).name == "tokenizer.json" and Path(info.tokenizer).exists()


def test_convert_from_hf_refuses_bad_input(small, tmp_path):
    cfg, model, hf_dir, ck = small
    with pytest.raises(CheckpointError, match="config.json is missing"):
        convert_from_hf(tmp_path, tmp_path / "o")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        convert_from_hf(broken, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_export_refuses_unrepresentable(small, tmp_path):
    from megamoe.hf import HFConversionError
    cfg, model, hf_dir, ck = small
    # a softmax model with a non-zero bias has no transformers equivalent (deepseek_v2 has no bias)
    soft = cfg.to_dict() | {"scoring_func": "softmax", "norm_topk_prob": False, "n_group": 1, "topk_group": 1}
    d = tmp_path / "soft" / "global_step0"
    d.mkdir(parents=True)
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(d / "model.safetensors"))
    (d / "megamoe_state.json").write_text(__import__("json").dumps(
        {"format": "megamoe-checkpoint-v1", "weights_only": True, "step": 0, "model_config": soft, "tokenizer": None}))
    (tmp_path / "soft" / "latest").write_text("global_step0")
    with pytest.raises(HFConversionError, match="non-zero selection bias"):
        convert_to_hf(tmp_path / "soft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_evaluate_matches_direct_computation(small, tmp_path):
    from megamoe.data.indexed import IndexedDatasetWriter
    from megamoe.inference import evaluate_lm, load_model
    cfg, model, hf_dir, ck = small
    lm = load_model(ck)
    assert lm.tokenizer is not None
    ids = np.asarray(lm.tokenizer.encode(TEXT[:600]), dtype=np.int64)
    prefix = tmp_path / "val"
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        w.add_document(ids[:70])
        w.add_document(ids[70:])
    res = evaluate_lm(lm, str(prefix), seq_len=32, batch_size=3, progress=False)
    model.eval()
    with torch.no_grad():   # one pass over the whole stream (it fits the context): same NLL
        logits = model(torch.from_numpy(ids)[None, :-1]).logits[0]
    # windows of 32 restart the context, so compare against the same windowing
    nll = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 32):
            x = torch.from_numpy(ids[s:s + 32 + 1])
            lg = model(x[None, :-1]).logits[0]
            nll += torch.nn.functional.cross_entropy(lg, x[1:], reduction="sum").item()
    assert res.tokens == len(ids) - 1
    assert math.isclose(res.nll, nll, rel_tol=1e-5)
    assert res.bytes == len(lm.tokenizer.decode(ids[1:].tolist()).encode())
    assert math.isclose(res.bits_per_byte, nll / math.log(2) / res.bytes, rel_tol=1e-5)
    assert logits.shape[0] == len(ids) - 1
    # a text file: every token predicted, bytes = the file's
    f = tmp_path / "val.txt"
    f.write_text(TEXT[:600])
    res_t = evaluate_lm(load_model(hf_dir), str(f), seq_len=64, progress=False)
    assert res_t.bytes == len(TEXT[:600].encode()) and res_t.tokens == len(ids)


def test_generate_stream_seed_and_greedy(small):
    from megamoe.inference import generate_text, load_model
    cfg, model, hf_dir, ck = small
    lm_hf, lm_ck = load_model(hf_dir), load_model(ck)
    pieces = []
    a = generate_text(lm_ck, "First Citizen:", max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=5,
                      on_text=pieces.append, stop_at_eos=False)
    b = generate_text(lm_hf, "First Citizen:", max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=5,
                      stop_at_eos=False)
    assert a == b                                     # same seed, same text from checkpoint and HF dir
    assert pieces
    if "\ufffd" not in a:
        # the stream is the text (byte-fallback garbage from this random model can re-decode
        # earlier bytes, which a stream cannot take back)
        assert "".join(pieces) == a
    g1 = generate_text(lm_ck, "All:", max_new_tokens=8, temperature=0)
    g2 = generate_text(lm_ck, "All:", max_new_tokens=8, temperature=0, seed=123)
    assert g1 == g2                                   # greedy ignores the seed


def test_generate_cli_validates_arguments_and_reports_errors(small, capsys):
    from megamoe.cli.generate import main
    cfg, model, hf_dir, ck = small
    for bad, msg in ((["--temperature", "-1"], "--temperature must be >= 0"), (["--top-k", "0"], "--top-k must be")):
        with pytest.raises(SystemExit):
            main(["--model", str(hf_dir), "--prompt", "x", *bad])
        assert msg in capsys.readouterr().err
    long_prompt = "First Citizen: " * (cfg.max_position_embeddings + 10)
    assert main(["--model", str(hf_dir), "--prompt", long_prompt, "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "generate: error: prompt is" in err and "context" in err and "Traceback" not in err


def test_preprocess_cli_reports_os_errors_and_warns_on_zero_documents(sp_file, tmp_path, capsys):
    from megamoe.cli.preprocess import main
    (tmp_path / "blocker").write_text("a file where a directory should be")
    (tmp_path / "in.txt").write_text(TEXT)
    assert main(["--input", str(tmp_path / "in.txt"), "--tokenizer", sp_file, "--output-prefix",
                 str(tmp_path / "blocker" / "out"), "--no-progress"]) == 1
    assert "preprocess: error:" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.warns(UserWarning, match="0 documents written"):
        assert main(["--input", str(tmp_path / "empty.txt"), "--tokenizer", sp_file, "--output-prefix",
                     str(tmp_path / "empty"), "--no-progress"]) == 0


def test_evaluate_and_generate_take_a_device_and_refuse_an_unavailable_one(small, tmp_path, capsys):
    import json as _json

    import torch

    from megamoe.cli.evaluate import main as evaluate_main
    from megamoe.cli.generate import main as generate_main
    from megamoe.inference import resolve_device, resolve_dtype
    cfg, model, hf_dir, ck = small
    assert resolve_device("cpu") == torch.device("cpu") and resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:400])
    assert evaluate_main(["--model", str(ck), "--data", str(text), "--device", "cpu", "--json", "--no-progress"]) == 0
    res = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens"] > 0 and math.isfinite(res["loss"])
    assert generate_main(["--model", str(hf_dir), "--prompt", "All:", "--max-new-tokens", "3", "--device", "cpu",
                          "--dtype", "bfloat16", "--temperature", "0"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        for main, extra in ((evaluate_main, ["--data", str(text)]), (generate_main, ["--prompt", "x"])):
            assert main(["--model", str(ck), "--device", "cuda", *extra]) == 1
            assert "no CUDA device is available here; use --device cpu" in capsys.readouterr().err
    assert generate_main(["--model", str(ck), "--device", "tpu", "--prompt", "x"]) == 1
    assert "--device tpu" in capsys.readouterr().err
