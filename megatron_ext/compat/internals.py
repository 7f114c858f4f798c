"""The version gate of the compat layer: the Megatron-Core internals it uses, checked before use.

Code outside :mod:`megatron_ext.compat` uses Megatron-Core's public API only. Where the project
needs more (a private function or attribute, the positional layout of a private method, a
behaviour no API promises), a compat module does it and declares what it relies on as
:class:`Internal` entries. Before the first use in a process, :func:`require` checks

* that the installed megatron-core is the version the compat layer was written for
  (:data:`~megatron_ext.compat.cpu.SUPPORTED_MEGATRON_CORE`): a private symbol can change its
  meaning without changing its name, so another version is refused outright;
* that each declared symbol still exists, with the parameters (and, where a positional layout is
  relied on, their order) and the source fragments the compat code depends on.

Either failure raises :class:`MegatronInternalError`, naming the symbol, the version the code was
written for and what to do. ``tests/unit/test_compat.py`` runs the symbol checks of every compat
module against the installed megatron-core without the version gate, so that after an upgrade
the failing tests list exactly the internals that changed.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Set, Tuple

from megatron_ext.compat.cpu import SUPPORTED_MEGATRON_CORE

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

_verified: Set[str] = set()


class MegatronInternalError(RuntimeError):
    """A Megatron-Core internal that the compat layer relies on is missing or has changed."""


def installed_megatron_core() -> str:
    """The installed megatron-core version string."""
    from megatron.core import package_info

    return package_info.__version__


@dataclass(frozen=True)
class Internal:
    """One internal symbol the compat layer relies on, and what about it is relied on."""

    module: str
    """Module that defines it, e.g. ``megatron.core.optimizer``."""
    name: str
    """Attribute path inside the module, e.g. ``_get_param_groups`` or ``TransformerLayer._forward_mlp``."""
    parameters: Tuple[str, ...] = ()
    """Parameters of the callable that are passed or read (``self`` not included)."""
    positional: bool = False
    """The parameters are passed by position: they must open the signature, in this order."""
    source_contains: Tuple[str, ...] = ()
    """Fragments of the symbol's source whose behaviour is relied on (what it reads or calls)."""

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.name}"

    def _owner(self) -> str:
        if self.module.split(".")[0] == "torch":
            import torch

            return f"torch {torch.__version__}"
        return f"megatron-core {installed_megatron_core()}"

    def _error(self, problem: str, user: str) -> MegatronInternalError:
        return MegatronInternalError(
            f"{self.symbol} {problem} in the installed {self._owner()}; {user} relies on it as it is in "
            f"megatron-core {SUPPORTED_MEGATRON_CORE}, the version megatron_ext.compat was written for. "
            f"Install megatron-core=={SUPPORTED_MEGATRON_CORE}, or port {user} to the installed version "
            "and update its declared internals."
        )

    def resolve(self, user: str = "megatron_ext.compat") -> Any:
        """The symbol itself; raises :class:`MegatronInternalError` if it does not exist."""
        try:
            target: Any = importlib.import_module(self.module)
        except ImportError as err:
            raise self._error(f"cannot be imported ({err})", user) from err
        for part in self.name.split("."):
            if not hasattr(target, part):
                raise self._error("does not exist", user)
            target = getattr(target, part)
        return target

    def check(self, user: str = "megatron_ext.compat") -> None:
        """Raise :class:`MegatronInternalError` unless the symbol exists as relied on."""
        target = self.resolve(user)
        if self.parameters:
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError) as err:
                raise self._error(f"is no longer a callable with a signature ({err})", user) from err
            names = [p for p in signature.parameters if p != "self"]
            missing = [p for p in self.parameters if p not in names]
            if missing:
                raise self._error(f"has the signature {signature}, without the parameters {missing}", user)
            if self.positional:
                leading = [p.name for p in signature.parameters.values() if p.kind in _POSITIONAL and p.name != "self"][
                    : len(self.parameters)
                ]
                if leading != list(self.parameters):
                    raise self._error(
                        f"has the signature {signature}, whose leading positional parameters "
                        f"are {leading}, not {list(self.parameters)}",
                        user,
                    )
        if self.source_contains:
            try:
                source = inspect.getsource(target)
            except (OSError, TypeError) as err:
                raise self._error(f"has no readable source ({err})", user) from err
            absent = [fragment for fragment in self.source_contains if fragment not in source]
            if absent:
                raise self._error(f"no longer contains {absent} in its source", user)


def require_supported_version(user: str, internals: Iterable[Internal]) -> None:
    """Raise :class:`MegatronInternalError` unless megatron-core is the supported version."""
    installed = installed_megatron_core()
    if installed != SUPPORTED_MEGATRON_CORE:
        symbols = ", ".join(internal.symbol for internal in internals)
        raise MegatronInternalError(
            f"{user} relies on megatron-core internals ({symbols}) as they are in megatron-core "
            f"{SUPPORTED_MEGATRON_CORE}, but megatron-core {installed} is installed. Install "
            f"megatron-core=={SUPPORTED_MEGATRON_CORE}, or check those symbols in megatron-core {installed}, "
            "update megatron_ext.compat and SUPPORTED_MEGATRON_CORE, and run tests/unit/test_compat.py."
        )


def require(user: str, internals: Tuple[Internal, ...]) -> None:
    """The version gate and the symbol checks of ``internals`` for ``user`` (the calling compat
    function, one set of internals each), once per process."""
    if user in _verified:
        return
    require_supported_version(user, internals)
    for internal in internals:
        internal.check(user)
    _verified.add(user)
