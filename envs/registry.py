"""Caches behind :func:`make_core`: loaded denoisers, engines, cores, and compiled functions shared by cores whose
configs differ only in data (reward weights, bank), so a λ sweep or a switch to the eval bank never recompiles."""
from __future__ import annotations

from typing import Any

from qpolicy.batched_conv import resolve as resolve_batched_conv
from qpolicy.denoiser import Denoiser, load_denoiser
from qpolicy.engine import QuantEngine, make_engine, quant_config

from .config import PROFILE_FIELDS, EnvConfig
from .core import DATA_FIELDS, Compiled, Environment, QuantDiffusionCore, QuantDiffusionLayerwiseCore

_DENOISERS: dict[str, Denoiser] = {}
_ENGINES: dict[EnvConfig, QuantEngine] = {}
_COMPILED: dict[tuple[bool, EnvConfig], Compiled] = {}
_CORES: dict[tuple[bool, EnvConfig], Environment] = {}
_PROFILES: dict[EnvConfig, Any] = {}


def resolve_model(model: Any) -> Denoiser:
    """A Denoiser from a Denoiser, a shipped model name or a checkpoint folder (loaded once per name)."""
    if isinstance(model, Denoiser):
        return model
    k = str(model)
    if k not in _DENOISERS:
        _DENOISERS[k] = load_denoiser(model)
    return _DENOISERS[k]


def static_config(cfg: EnvConfig) -> EnvConfig:
    """``cfg`` with its data fields (reward mode and weights, bank) at their defaults: cores that agree on
    it share their engine and compiled functions (the data travels in :class:`~qpolicy.envs.core.EnvParams`)."""
    return cfg.replace(**{**{f: getattr(EnvConfig, f) for f in DATA_FIELDS}, "bank_size": cfg.images_per_env})


def engine_for(cfg: EnvConfig) -> QuantEngine:
    """The quantized sampler of an env config (one per static config, shared by per-step and layer-wise cores);
    with ``cost: latency`` the BOPs engine's copy carrying the verified latency table (no second calibration)."""
    # the action space (bits or profiles) never shapes the quantized sampler
    sk = static_config(cfg).replace(**{f: getattr(EnvConfig, f) for f in PROFILE_FIELDS})
    if sk not in _ENGINES:
        impl = resolve_batched_conv(cfg.batched_conv)
        if cfg.batched_conv != "xla":  # a speed knob: the XLA-rule engine's copy, not recalibrated
            _ENGINES[sk] = engine_for(sk.replace(batched_conv="xla")).with_batched_conv(impl)
        elif cfg.cost == "latency":
            from qpolicy.latency import load_for

            base = engine_for(sk.replace(cost="bops", latency_table=None))
            _ENGINES[sk] = base.with_latency(load_for(base.den, cfg.bit_choices, cfg.latency_table))
        else:
            qcfg = quant_config(cfg.quant_preset, act_ranges=cfg.act_ranges, bit_choices=cfg.bit_choices)
            _ENGINES[sk] = make_engine(resolve_model(cfg.model), steps=cfg.num_steps, sampler=cfg.sampler,
                                       eta=cfg.eta, qcfg=qcfg)
    return _ENGINES[sk]


def profiles_of(cfg: EnvConfig, *, progress: bool = False) -> Any:
    """The :class:`qpolicy.profiles.Profiles` of a config with ``action_space: profiles`` (its file, or the cached
    search), resolved once per process and config."""
    from qpolicy.profiles import profiles_for

    if cfg.action_space != "profiles":
        raise ValueError(f"action_space is {cfg.action_space!r}; profiles exist for action_space 'profiles' only")
    k = cfg.replace(bank="train", bank_size=cfg.images_per_env)  # the search never reads the env's bank
    if k not in _PROFILES:
        _PROFILES[k] = profiles_for(cfg, engine_for(cfg), progress=progress)
    return _PROFILES[k]


def make_core(*, layerwise: bool = False, config: EnvConfig | None = None, **kwargs: Any) -> Environment:
    """Build (or reuse) a core for :class:`EnvConfig` fields ``kwargs`` (or ``config``, updated by kwargs).

    Cores are cached per config; cores whose configs differ only in data fields (``DATA_FIELDS``: reward,
    alpha, lam, budget, beta_fd, error_clip, bank, bank_size) share one engine, one :class:`Compiled` (jitted
    functions and trace counts)."""
    cfg = config if config is not None else EnvConfig(**kwargs)
    if config is not None and kwargs:
        cfg = config.replace(**kwargs)
    k = (bool(layerwise), cfg)
    if k not in _CORES:
        if cfg.action_space == "profiles":
            if layerwise:
                raise ValueError("action_space 'profiles' picks one profile (a whole step's per-layer bits) per step: "
                                 "use the per-step env (layerwise: false), or action_space 'bits' with the "
                                 "layer-wise env")
            from .profiles import QuantDiffusionProfileCore

            prof = profiles_of(cfg)
            # the profiles are constants of the compiled step: configs share compiled functions only with equal
            # profiles (budget, a data field elsewhere, shapes the searched profiles)
            sk = (False, static_config(cfg), prof.bits_w.tobytes() + prof.bits_a.tobytes())
            core = QuantDiffusionProfileCore(cfg, engine_for(cfg), prof, compiled=_COMPILED.get(sk))
            _COMPILED.setdefault(sk, core.compiled)
            _CORES[k] = core
            return core
        cls = QuantDiffusionLayerwiseCore if layerwise else QuantDiffusionCore
        sk = (bool(layerwise), static_config(cfg))
        core = cls(cfg, engine_for(cfg), compiled=_COMPILED.get(sk))
        _COMPILED.setdefault(sk, core.compiled)
        _CORES[k] = core
    return _CORES[k]
