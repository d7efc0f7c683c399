"""Terminal progress for pulls: one bar for the total bytes, huggingface_hub's bar per file."""

from __future__ import annotations

import sys

import click
from tqdm.auto import tqdm


class PullBars:
    def __init__(self, name: str):
        self.name = name
        self.total: tqdm | None = None
        self.file: tqdm | None = None
        self.current = None
        self.tty = sys.stderr.isatty()

    def status(self, message: str) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
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
            self.total.update(nbytes)
        if self.tty:
            if self.current is not file:
                if self.file is not None:
                    self.file.close()
                self.current = file
                self.file = tqdm(total=file.size, unit="B", unit_scale=True, desc=f"  {file.path}", leave=False,
                                 position=1, file=sys.stderr, mininterval=0.2)
            self.file.update(nbytes)

    def done(self, file) -> None:
        if self.file is not None and self.current is file:
            self.file.close()
            self.file, self.current = None, None
        if not self.tty:
            click.echo(f"  {file.path}: ok", err=True)
