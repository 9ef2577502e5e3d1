from cliviz.cli.main import main

main()
