"""Terminal progress for pulls: one bar for the total bytes, huggingface_hub's bar per file."""

from __future__ import annotations

import sys

import click
from tqdm.auto import tqdm


class PullBars:
    def __init__(self, name: str):
        self.name = name
        self.total: tqdm | None = None
        self.tty = sys.stderr.isatty()

    def status(self, message: str) -> None:
        if self.total is not None:
            self.total.close()
            self.total = None
        click.echo(message, err=True)

    def start(self, files) -> None:
        size = sum(f.size for f in files)
        click.echo(f"{len(files)} files, {size / 1e6:.1f} MB", err=True)
        self.total = tqdm(total=size, unit="B", unit_scale=True, desc=f"pulling {self.name}", leave=True, position=0,
                          file=sys.stderr, mininterval=0.2 if self.tty else 5)

    def advance(self, file, nbytes: int) -> None:
        if self.total is not None:
            if self.tty and self.total.postfix != file.path:
                self.total.set_postfix_str(file.path, refresh=False)
            self.total.update(nbytes)

    def done(self, file) -> None:
        if not self.tty:
            click.echo(f"  {file.path}: ok", err=True)
