from kvbatch.cli import app

app(prog_name="kvbatch")
