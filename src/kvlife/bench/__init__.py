"""The shared-context benchmark: tasks/ (one file per task), score.py, runner.py, report.py."""
