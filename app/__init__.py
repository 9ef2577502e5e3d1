"""The Dash dashboard (imported as `cliviz.app`)."""
