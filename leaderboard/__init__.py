"""The leaderboard of eval.py results: `python leaderboard/build.py` (or `python -m leaderboard.build`)."""
