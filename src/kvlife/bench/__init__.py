"""The shared-context benchmark: tasks, scorers, the runner, summaries and the HTML report (README.md)."""
