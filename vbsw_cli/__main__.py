from vbsw_cli.cli import main

main()
