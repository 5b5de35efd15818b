"""The reader interface every checkpoint format is opened through.

A ``ParamReader`` lists canonical parameter names (Hugging Face ``GPTNeoXForCausalLM`` keys,
buffers skipped) and hands out one tensor at a time, so that a 12B comparison never holds more
than a tensor or two in memory.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping

import torch

from retrace.checkpoints.names import BUFFER_SUFFIXES, is_buffer_name  # noqa: F401 - re-exported


class ParamReader(abc.ABC):
    """Read-only access to one checkpoint's parameters, tensor by tensor."""

    #: Where the parameters come from (a path or ``repo@revision``), for error messages.
    source: str

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Canonical parameter names, in a stable order."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one parameter without loading it where the format allows."""

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """One parameter as a CPU tensor in its stored dtype."""

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of one parameter; readers that can, answer without loading it."""
        return self.get(name).dtype

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def location(self, name: str) -> str:
        """The file (or source) that holds ``name``, for error messages; readers refine it."""
        return self.source

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files; readers holding nothing open need not override it."""

    def __enter__(self) -> ParamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"


class IndexedReader(ParamReader):
    """A reader that indexed every tensor's shape and dtype on open (from file headers), so
    ``shape``/``dtype`` answer without loading; subclasses fill ``_shapes`` and ``_dtypes``."""

    _shapes: dict[str, tuple[int, ...]]
    _dtypes: dict[str, torch.dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise KeyError(f"{self.source}: no parameter {name}")
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        if name not in self._dtypes:
            raise KeyError(f"{self.source}: no parameter {name}")
        return self._dtypes[name]


class DictReader(ParamReader):
    """Parameters already in memory (a model's state_dict, a merged NeoX checkpoint)."""

    def __init__(self, params: Mapping[str, torch.Tensor], source: str = "<memory>"):
        self._params = {k: v for k, v in params.items() if not is_buffer_name(k)}
        self.source = source

    def names(self) -> list[str]:
        return list(self._params)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._params[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._params[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._params[name].dtype
