"""The application: command line, runner, plan, report, progress, the demo-disk builder."""
