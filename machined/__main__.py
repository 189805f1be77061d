from machined.cli import run

run()
