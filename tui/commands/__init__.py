"""One module per `qlc` subcommand (or a few related ones). Each defines

    def register(sub: argparse._SubParsersAction) -> None

which adds its parser(s) and sets `func=run` (a callable taking the parsed args, returning an exit
code). tui/cli.py discovers the modules, so adding a command touches no other file.
"""
