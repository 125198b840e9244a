"""The adapter conformance suite: the checks every adapter must pass, runnable from any repository.

An adapter author describes a tiny model of the architecture as a ``ConformanceCase`` (how to
build it, how to run one forward at a given number of temporal tokens) and runs every check on it,
in their own test file::

    from freeloc.testing import ConformanceCase, conformance_tests

    CASES = [ConformanceCase("mymodel", make_model, run, trained_video_frames=21, trained_latent=6)]
    test_conformance = conformance_tests(CASES)    # one pytest test per (case, check)

or without pytest: ``run_conformance(CASES)`` runs them all and raises ``ConformanceError``
listing every failure. Each check is a plain function of a case (``check_*``, listed in
``CHECKS``); a check that does not apply to a case (a model without RoPE, a case whose model is
not available here) raises ``NotApplicable`` with the reason, which pytest reports as a skip.

This module needs only torch and freeloc; pytest is imported by ``conformance_tests`` alone.
"""

from __future__ import annotations

import copy
import pickle
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .adapter import LayerContext
from .attention import AttentionOptions, attend
from .plan import LayerPlan
from .session import Session, enable

__all__ = [
    "CHECKS",
    "SLOW_CHECKS",
    "Check",
    "CheckResult",
    "ConformanceCase",
    "ConformanceError",
    "NotApplicable",
    "check_at_trained_length_equals_unhooked",
    "check_bad_input_leaves_the_model_unchanged",
    "check_compiles_and_exports",
    "check_copies_and_pickles",
    "check_direct_equals_unhooked",
    "check_double_apply_is_refused",
    "check_forced_plain_bands_equal_unhooked",
    "check_hooked_layer_equals_core_attend",
    "check_identity_plan_equals_unhooked",
    "check_long_video_within_cap_and_finite",
    "check_removal_is_exact_also_after_an_exception",
    "conformance_tests",
    "run_conformance",
]


@dataclass(frozen=True)
class ConformanceCase:
    """A tiny, randomly initialised model of one architecture, and how to run it.

    Attributes:
        name: the case's name (test ids, messages).
        make_model: builds the model (seeded, ``eval()``), on CPU, fp32; milliseconds per forward.
        run: ``run(model, frames)`` runs one forward at ``frames`` temporal tokens with fixed seeded
            inputs (latents, text embeddings, timestep) under ``torch.no_grad()`` and returns the output.
        trained_video_frames: passed as ``trained_frames=`` (video frames) to ``freeloc.enable``.
        trained_latent: the same length in temporal tokens.
        text_tokens: text tokens in each self-attention sequence (0: video only).
        position_methods: whether the model has RoPE (position methods apply).
        skip_reason: why this case cannot run here (e.g. its model's code is not available); every
            check then reports ``NotApplicable`` with it. None: the case runs.
    """

    name: str
    make_model: Callable[[], torch.nn.Module]
    run: Callable[[torch.nn.Module, int], torch.Tensor]
    trained_video_frames: int
    trained_latent: int
    text_tokens: int = 0
    position_methods: bool = True
    skip_reason: str | None = None

    @property
    def long_frames(self) -> int:
        """The long length of the checks: 4x the trained length, in temporal tokens."""
        return 4 * self.trained_latent


class NotApplicable(Exception):  # noqa: N818 (an outcome, not an error)
    """A check does not apply to a case; the message says why."""


class ConformanceError(AssertionError):
    """One or more checks failed; the message lists each failure."""


#: A check: a function of a case that returns when the adapter conforms and raises otherwise.
Check = Callable[[ConformanceCase], None]


# ---------------------------------------------------------------------------------------------- helpers
def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _close(case: ConformanceCase, what: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    try:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    except AssertionError as e:
        raise AssertionError(f"{case.name}: {what}\n{e}") from None


def _model(case: ConformanceCase) -> torch.nn.Module:
    if case.skip_reason is not None:
        raise NotApplicable(case.skip_reason)
    return case.make_model()


def _enable(case: ConformanceCase, model: torch.nn.Module, **kwargs: Any) -> Session:
    return enable(model, trained_frames=case.trained_video_frames, **kwargs)


def _uniform(case: ConformanceCase) -> dict[str, Any]:
    """The uniform plan for the model: VRPR everywhere, or TSA where the model has no RoPE."""
    return dict(plan="uniform") if case.position_methods else dict(method="tsa")


def _layer_count(case: ConformanceCase, model: torch.nn.Module) -> int:
    with _enable(case, model, method="direct") as session:
        return len(session.layers)


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a session may touch: each module's processor (by identity), hooks and attributes; weights
    and buffers (by value)."""
    return {
        "processors": [getattr(m, "processor", None) for m in model.modules()],
        "hooks": [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()],
        "attributes": [sorted(m.__dict__) for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
    }


def assert_restored(case: ConformanceCase, before: dict[str, Any], model: torch.nn.Module, when: str) -> None:
    """The model is exactly as in ``before`` (a ``snapshot``)."""
    after = snapshot(model)
    _expect(len(before["processors"]) == len(after["processors"]) and all(
        a is b for a, b in zip(before["processors"], after["processors"], strict=True)),
        f"{case.name}: {when}, a module's processor is not the original object")
    _expect(before["hooks"] == after["hooks"], f"{case.name}: {when}, a forward hook was left on a module")
    _expect(before["attributes"] == after["attributes"], f"{case.name}: {when}, a module's attributes changed")
    for key in ("state", "buffers"):
        _expect(before[key].keys() == after[key].keys()
                and all(torch.equal(before[key][k], after[key][k]) for k in before[key]),
                f"{case.name}: {when}, the model's {key} changed")


class _BoomError(Exception):
    """Raised inside a session to check that leaving it by an exception removes it."""


@contextmanager
def _recording_layer_zero() -> Iterator[list[dict[str, Any]]]:
    """Records the first ``LayerContext.attend`` call of layer 0 (its inputs and output) while active."""
    calls: list[dict[str, Any]] = []
    original = LayerContext.attend

    def attend_and_record(ctx: LayerContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: Any,
                          **kwargs: Any) -> torch.Tensor:
        out = original(ctx, q, k, v, method, **kwargs)
        if ctx.layer == 0 and not calls:
            calls.append(dict(q=q, k=k, v=v, method=method, kwargs=kwargs, out=out, grid=ctx.grid.value,
                              rotary=ctx.rotary, options=ctx.options))
        return out

    LayerContext.attend = attend_and_record  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        LayerContext.attend = original  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------- checks
def check_direct_equals_unhooked(case: ConformanceCase) -> None:
    """``method="direct"`` (every layer unchanged) gives the unhooked output at 4x the trained length."""
    model = _model(case)
    base = case.run(model, case.long_frames)
    with _enable(case, model, method="direct"):
        out = case.run(model, case.long_frames)
    _close(case, "method='direct' differs from the unhooked model", out, base, atol=1e-6, rtol=0.0)


def check_identity_plan_equals_unhooked(case: ConformanceCase) -> None:
    """A plan of ``"direct"`` on every layer gives the unhooked output at 4x the trained length."""
    model = _model(case)
    base = case.run(model, case.long_frames)
    n = _layer_count(case, model)
    with _enable(case, model, plan=LayerPlan.uniform("direct", n)):
        out = case.run(model, case.long_frames)
    _close(case, "an identity plan differs from the unhooked model", out, base, atol=1e-6, rtol=0.0)


def check_at_trained_length_equals_unhooked(case: ConformanceCase) -> None:
    """At the trained length the uniform plan changes nothing: the output is bit for bit the unhooked one."""
    model = _model(case)
    base = case.run(model, case.trained_latent)
    with _enable(case, model, **_uniform(case)):
        out = case.run(model, case.trained_latent)
    _expect(torch.equal(out, base), f"{case.name}: at the trained length ({case.trained_latent} temporal tokens) "
                                    f"the hooked output is not bit-identical to the unhooked one (largest difference "
                                    f"{float((out - base).abs().max()):.3g})")


def check_forced_plain_bands_equal_unhooked(case: ConformanceCase) -> None:
    """Every layer through the adapter's own q/k/v and ``attend`` with one plain band equals the model.

    This checks the adapter's q/k/v, rotary layout, text handling and output projection in one go.
    """
    if not case.position_methods:
        raise NotApplicable(f"{case.name} has no RoPE: a VRPR band cannot be forced on it")
    model = _model(case)
    f = case.long_frames
    base = case.run(model, f)
    n = _layer_count(case, model)
    plain = LayerPlan.uniform("vrpr", n, w1=f, w2=f + 1, g1=1, g2=1, cap=f - 1)
    with _enable(case, model, plan=plain) as session:
        out = case.run(model, f)
    idle = [s.layer for s in session.layers if s.calls < 1]
    _expect(not idle, f"{case.name}: layers {idle} were never called through freeloc")
    _close(case, "attention forced through attend with one plain band differs from the unhooked model (check the "
                 "processor's q/k/v, the rotary layout, the text placement and the output projection)",
           out, base, atol=2e-5, rtol=1e-4)


def check_long_video_within_cap_and_finite(case: ConformanceCase) -> None:
    """At 4x the trained length the uniform plan changes the output, keeps it finite, and keeps every
    hooked layer's temporal distances within the trained range (or, without RoPE, its density below 1)."""
    model = _model(case)
    f = case.long_frames
    direct = case.run(model, f)
    with _enable(case, model, **_uniform(case)) as session:
        out = case.run(model, f)
    _expect(bool(torch.isfinite(out).all()), f"{case.name}: the output at {f} temporal tokens is not finite")
    _expect(float((out - direct).abs().max()) > 1e-5, f"{case.name}: the uniform plan did not change the output "
                                                      f"at {f} temporal tokens")
    hooked = [s for s in session.layers if s.calls]
    _expect(bool(hooked), f"{case.name}: no hooked layer was called")
    if case.position_methods:
        far = [(s.layer, s.max_abs_distance) for s in hooked if s.max_abs_distance > case.trained_latent - 1]
        _expect(not far, f"{case.name}: (layer, max |r|) {far} exceed the trained range {case.trained_latent - 1}")
    else:
        dense = [s.layer for s in hooked if s.density >= 1.0]
        _expect(not dense, f"{case.name}: layers {dense} attended every pair under TSA")


def check_removal_is_exact_also_after_an_exception(case: ConformanceCase) -> None:
    """Leaving the ``with`` block, leaving it by an exception, and ``session.remove()`` without a block
    each restore the model exactly (processors, hooks, attributes, weights), and the output with it."""
    model = _model(case)
    base = case.run(model, case.long_frames)
    before = snapshot(model)
    with _enable(case, model, **_uniform(case)):
        case.run(model, case.long_frames)
    assert_restored(case, before, model, "after the with-block")
    try:
        with _enable(case, model, **_uniform(case)):
            case.run(model, case.long_frames)
            raise _BoomError
    except _BoomError:
        pass
    assert_restored(case, before, model, "after an exception inside the with-block")
    session = _enable(case, model, method="tsa")
    case.run(model, case.long_frames)
    session.remove()
    session.remove()  # removing twice is harmless
    assert_restored(case, before, model, "after session.remove()")
    _expect(torch.equal(case.run(model, case.long_frames), base),
            f"{case.name}: after removal the output is not bit-identical to the unhooked one")


def check_double_apply_is_refused(case: ConformanceCase) -> None:
    """Enabling freeloc on a model that has it already is refused, leaving the first session intact."""
    model = _model(case)
    with _enable(case, model, **_uniform(case)) as first:
        during = snapshot(model)
        try:
            _enable(case, model, method="tsa")
        except RuntimeError as e:
            _expect("already applied" in str(e), f"{case.name}: the second enable raised {e!r}, expected "
                                                 f"'freeloc is already applied ...'")
        else:
            raise AssertionError(f"{case.name}: a second freeloc.enable on the same model was accepted")
        assert_restored(case, during, model, "after a refused second enable")
        _expect(first.active, f"{case.name}: the first session is no longer active")


def check_bad_input_leaves_the_model_unchanged(case: ConformanceCase) -> None:
    """Bad arguments to ``freeloc.enable`` raise a clear error before anything is installed."""
    model = _model(case)
    before = snapshot(model)
    n = _layer_count(case, model)
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        (dict(plan=LayerPlan.uniform("direct", n + 1)), ValueError, f"{n + 1}"),
        (dict(plan="uniform", num_frames=0), ValueError, "num_frames must be a positive int"),
        (dict(method="no-such-method"), ValueError, "method must be one of"),
        (dict(plan="uniform", attention={"layout": "packed"}), TypeError, "AttentionOptions"),
    ]
    for kwargs, error, words in bad:
        try:
            _enable(case, model, **kwargs)
        except error as e:
            _expect(words in str(e), f"{case.name}: enable({kwargs}) raised {e!r}, which does not say {words!r}")
        else:
            raise AssertionError(f"{case.name}: enable({kwargs}) was accepted")
        assert_restored(case, before, model, f"after the refused enable({kwargs})")


def check_hooked_layer_equals_core_attend(case: ConformanceCase) -> None:
    """Layer 0's attention under TSA equals the core's reference ``attend`` on its own q/k/v; the text
    tokens the adapter declares are the case's, and text queries attend densely with their positions."""
    model = _model(case)
    options = AttentionOptions()
    with _recording_layer_zero() as calls:
        with _enable(case, model, method="tsa", attention=options):
            case.run(model, case.long_frames)
    _expect(bool(calls), f"{case.name}: layer 0 never attended through freeloc")
    c = calls[0]
    _expect(c["options"] is options, f"{case.name}: layer 0 did not get the AttentionOptions given to enable")
    kw = c["kwargs"]
    ref = attend(c["q"], c["k"], c["v"], grid=c["grid"], method=c["method"], rotary=c["rotary"],
                 backend="reference", **kw)
    _close(case, "layer 0's attention differs from the reference attend on its q/k/v", c["out"], ref,
           atol=2e-5, rtol=1e-4)
    text_before, text_after = kw.get("text_before", 0), kw.get("text_after", 0)
    _expect(text_before + text_after == case.text_tokens,
            f"{case.name}: the adapter passed text_before={text_before}, text_after={text_after} to attend; the case "
            f"has {case.text_tokens} text tokens")
    if case.text_tokens:
        plain = attend(c["q"], c["k"], c["v"], grid=c["grid"], method=None, rotary=c["rotary"],
                       backend="reference", **kw)
        n = c["q"].shape[1]
        rows = list(range(text_before)) + list(range(n - text_after, n))
        _close(case, "text queries do not attend densely with the original positions", ref[:, rows], plain[:, rows],
               atol=1e-6, rtol=0.0)


def _forward_inputs(case: ConformanceCase, model: torch.nn.Module, frames: int) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments of the model's forward in ``case.run(model, frames)``."""
    seen: list[tuple[tuple, dict[str, Any]]] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append((a, dict(kw))) if not seen else None,
                                             with_kwargs=True)
    try:
        case.run(model, frames)
    finally:
        handle.remove()
    return seen[0]


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a forward's output (a tensor, a tuple, a dict or a diffusers output dataclass)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


@contextmanager
def _without_runtime_type_checks() -> Iterator[None]:
    """jaxtyping's runtime checks off: a test suite may install them (``--jaxtyping-packages``), and the
    tracers of ``torch.compile`` and ``torch.export`` cannot follow their signature binding."""
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


def check_compiles_and_exports(case: ConformanceCase) -> None:
    """``torch.compile(model, fullgraph=True)`` and ``torch.export`` of a hooked model trace without a graph
    break, in identity mode and with a method changing every layer, and give the eager hooked output."""
    with _without_runtime_type_checks():
        _compiles_and_exports(case)


def _compiles_and_exports(case: ConformanceCase) -> None:
    model = _model(case)
    f = case.long_frames
    args, kwargs = _forward_inputs(case, model, f)

    def compiled(m: torch.nn.Module) -> torch.Tensor:
        return case.run(torch.compile(m, fullgraph=True, backend="eager"), f)

    def exported(m: torch.nn.Module, strict: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            return _tensors(torch.export.export(m, args, kwargs, strict=strict).module()(*args, **kwargs))

    # what the unhooked model itself cannot do is outside what freeloc can promise
    with torch.no_grad():
        base = _tensors(model(*args, **kwargs))
    tracers: dict[str, Callable[[], list[torch.Tensor]]] = {"torch.compile(fullgraph=True)": lambda: [compiled(model)]}
    for strict in (True, False):
        tracers[f"torch.export(strict={strict})"] = lambda strict=strict: exported(model, strict)
    unsupported = {}
    for name, trace in tracers.items():
        torch._dynamo.reset()
        try:
            got = trace()
        except Exception as e:
            unsupported[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        same = len(got) == len(base) and all(
            torch.allclose(g, b, atol=1e-5, rtol=1e-5) for g, b in zip(got, base, strict=True))
        if not same:
            unsupported[name] = "the traced unhooked model differs from the eager one"
    if len(unsupported) == len(tracers):
        raise NotApplicable(f"the unhooked {case.name} does not trace: {unsupported}")
    for kwargs_enable in (dict(method="direct"), _uniform(case)):
        with _enable(case, model, **kwargs_enable):
            eager = case.run(model, f)
            with torch.no_grad():
                want = _tensors(model(*args, **kwargs))
            if "torch.compile(fullgraph=True)" not in unsupported:
                torch._dynamo.reset()
                _close(case, f"torch.compile(fullgraph=True) with {kwargs_enable} differs from eager", compiled(model),
                       eager, atol=1e-5, rtol=1e-5)
            for strict in (True, False):
                if f"torch.export(strict={strict})" in unsupported:
                    continue
                torch._dynamo.reset()
                try:
                    got = exported(model, strict)
                except Exception as e:  # a refusal is fine when it says so clearly
                    if str(e).startswith("freeloc"):
                        continue
                    raise
                for g, w in zip(got, want, strict=True):
                    _close(case, f"torch.export(strict={strict}) with {kwargs_enable} differs from eager", g, w,
                           atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def check_copies_and_pickles(case: ConformanceCase) -> None:
    """A ``copy.deepcopy`` and a pickled copy of a hooked model run with FreeLOC like the original, without
    touching it, and ``Session.of(copy).remove()`` restores the copy exactly."""
    model = _model(case)
    f = case.long_frames
    base = case.run(model, f)
    with _enable(case, model, **_uniform(case)):
        hooked = case.run(model, f)
        for how, clone in (("copy.deepcopy", copy.deepcopy), ("pickle", lambda m: pickle.loads(pickle.dumps(m)))):
            twin = clone(model)
            _close(case, f"a {how} of the hooked model does not run with FreeLOC", case.run(twin, f), hooked,
                   atol=0.0, rtol=0.0)
            _close(case, f"running a {how} of the hooked model changed the original", case.run(model, f), hooked,
                   atol=0.0, rtol=0.0)
            Session.of(twin).remove()
            _expect(torch.equal(case.run(twin, f), base),
                    f"{case.name}: after Session.of(copy).remove() a {how} is not the unhooked model")
            _expect(not any(type(getattr(m, "processor", None)).__module__.startswith("freeloc")
                            for m in twin.modules()), f"{case.name}: a {how} kept a freeloc processor after removal")
        _close(case, "removing a copy's session changed the original", case.run(model, f), hooked, atol=0.0, rtol=0.0)


#: Every check, in the order ``run_conformance`` runs them.
CHECKS: tuple[Check, ...] = (
    check_direct_equals_unhooked,
    check_identity_plan_equals_unhooked,
    check_at_trained_length_equals_unhooked,
    check_forced_plain_bands_equal_unhooked,
    check_long_video_within_cap_and_finite,
    check_removal_is_exact_also_after_an_exception,
    check_double_apply_is_refused,
    check_bad_input_leaves_the_model_unchanged,
    check_hooked_layer_equals_core_attend,
    check_compiles_and_exports,
    check_copies_and_pickles,
)


#: Checks that take seconds rather than milliseconds (they trace the model several times).
SLOW_CHECKS: tuple[Check, ...] = (check_compiles_and_exports,)


def _check_name(check: Check) -> str:
    name = getattr(check, "__name__", repr(check))
    return name[len("check_"):] if name.startswith("check_") else name


# ---------------------------------------------------------------------------------------------- runners
@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one case: ``detail`` is the skip reason or the failure, ``where`` the
    failure's traceback (the frames from the check down to the error)."""

    case: str
    check: str
    outcome: Literal["passed", "skipped", "failed"]
    detail: str = ""
    where: str = ""

    def __str__(self) -> str:
        return f"{self.case} / {self.check}: {self.outcome}" + (f" ({self.detail})" if self.detail else "")


def _as_cases(cases: ConformanceCase | Sequence[ConformanceCase]) -> list[ConformanceCase]:
    out = [cases] if isinstance(cases, ConformanceCase) else list(cases)
    if not out or not all(isinstance(c, ConformanceCase) for c in out):
        raise ValueError(f"expected a ConformanceCase or a non-empty sequence of them, got {cases!r}")
    return out


def run_conformance(cases: ConformanceCase | Sequence[ConformanceCase], checks: Sequence[Check] = CHECKS, *,
                    raise_on_failure: bool = True, verbose: bool = False) -> list[CheckResult]:
    """Run every check on every case.

    Args:
        cases: one case or several.
        checks: the checks to run (default: all of ``CHECKS``).
        raise_on_failure: raise ``ConformanceError`` listing every failure (after running all checks).
        verbose: print each result as it comes.

    Returns:
        One ``CheckResult`` per (case, check); checks that do not apply are ``"skipped"`` with the reason.
    """
    results = []
    for case in _as_cases(cases):
        for check in checks:
            try:
                check(case)
            except NotApplicable as e:
                result = CheckResult(case.name, _check_name(check), "skipped", str(e))
            except Exception as e:
                result = CheckResult(case.name, _check_name(check), "failed", f"{type(e).__name__}: {e}",
                                     "".join(traceback.format_tb(e.__traceback__)))
            else:
                result = CheckResult(case.name, _check_name(check), "passed")
            if verbose:
                print(str(result).splitlines()[0], flush=True)
            results.append(result)
    failed = [r for r in results if r.outcome == "failed"]
    if failed and raise_on_failure:
        raise ConformanceError(f"{len(failed)} of {len(results)} conformance checks failed:\n\n"
                               + "\n\n".join(f"{r}\n{r.where}" for r in failed))
    return results


def conformance_tests(cases: Sequence[ConformanceCase], checks: Sequence[Check] = CHECKS) -> Callable[..., None]:
    """A pytest test function parametrized over every (case, check); assign it to a ``test_*`` name.

    Example::

        test_conformance = conformance_tests(CASES)

    Test ids are ``<case>-<check>`` (e.g. ``mymodel-removal_is_exact_also_after_an_exception``); a check
    that does not apply is skipped with its reason (shown by ``pytest -rs``). The checks of ``SLOW_CHECKS``
    carry the marker ``slow`` (register it in your pytest configuration to select or deselect them).
    """
    import pytest

    cases = _as_cases(cases)
    params = [pytest.param(case, check, id=f"{case.name}-{_check_name(check)}",
                           marks=[pytest.mark.slow] if check in SLOW_CHECKS else [])
              for case in cases for check in checks]

    @pytest.mark.parametrize(("case", "check"), params)
    def test_conformance(case: ConformanceCase, check: Check) -> None:
        try:
            check(case)
        except NotApplicable as e:
            print(f"{case.name} / {_check_name(check)}: not applicable: {e}")
            pytest.skip(str(e))

    return test_conformance
