"""The web dashboard: server-rendered HTML (Jinja2), plots as inline SVG, no external assets."""
