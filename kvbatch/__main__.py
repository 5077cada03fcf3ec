from kvbatch.runner.cli import app

app(prog_name="kvbatch")
