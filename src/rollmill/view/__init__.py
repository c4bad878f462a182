"""`rollmill view RUN_DIR...`: a local, read-only web page over runs' curves and samples."""

from rollmill.view.server import load_runs, make_server, serve_in_thread, url_of

__all__ = ["load_runs", "make_server", "serve_in_thread", "url_of"]
