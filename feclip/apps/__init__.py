"""The command-line apps (``feclip-train``, ``feclip-eval``, ``feclip-data``, ``feclip-predict``,
``feclip-report``): argument parsing, Hydra and exit statuses live here and only here; each app calls
plain library functions of :mod:`feclip`, which imports neither argparse nor Hydra."""
