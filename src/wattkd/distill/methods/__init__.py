"""KD methods, one file each, registered with `@register_method` (see registry.py); the
registry imports every file of this package on first use."""

from wattkd.distill.methods.registry import (
    MethodSpec,
    check_method,
    get_method,
    known_methods,
    method_params,
    register_method,
)

__all__ = ["MethodSpec", "check_method", "get_method", "known_methods", "method_params",
           "register_method"]
