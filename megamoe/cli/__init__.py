"""The command-line tools: `python tools/X.py` and the `megamoe-X` console scripts run main() here."""
