from cliviz.cli.main import entry

entry()
