"""The web adapter: the REST chat API, the admin API and (later) the browser chat page."""

from adapters.web.app import CONTEXT, WebContext, create_app

__all__ = ["CONTEXT", "WebContext", "create_app"]
