"""What every distillation method is: parameters with published defaults and their checks, the stage-2
statistics it reads, and its loss. A run builds its method once; the per-step `loss` checks nothing."""
from kdcache.encodings import Sampled
from kdcache.errors import UserError, colon_hint, is_int, is_number

# The checks a parameter's value passes: (is it valid, what it must be, normalise).
POSITIVE = (lambda v: is_number(v) and v > 0, "a number > 0", float)
NON_NEGATIVE = (lambda v: is_number(v) and v >= 0, "a number >= 0", float)
FLAG = (lambda v: isinstance(v, bool), "true or false", bool)
EPOCHS = (lambda v: is_int(v, 0), "an integer >= 0 (epochs)", int)


class Method:
    """A method: `parameters` maps each name to (published default, check); `ls_defaults` are the defaults that
    `standardize: true` (LS) changes. The training loss is w_ce * CE + w_kd * loss(...), so every method has
    w_ce and every distilling one w_kd.

    Building checks `params` and fills in the defaults (UserError on a mistake): `self.params`.
    """

    parameters = {}
    ls_defaults = {}

    def __init__(self, name, params=None):
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise UserError(f"unknown parameter(s) {', '.join(map(str, unknown))} for method {name!r}; "
                            f"allowed: {', '.join(self.parameters)}{colon_hint(unknown)}")
        defaults = {k: default for k, (default, _) in self.parameters.items()}
        if params.get("standardize") is True:
            defaults.update(self.ls_defaults)
        self.name, self.params = name, {}
        for k, value in {**defaults, **params}.items():
            valid, must_be, normalise = self.parameters[k][1]
            if not valid(value):
                raise UserError(f"method {name!r}: parameter {k}={value!r} must be {must_be}")
            self.params[k] = normalise(value)

    def statistics(self):
        """The stage-2 statistics `loss` reads: {its name in `stats`: (statistic, options of
        kdcache.stats.read_stat)}. Stage 3 reads them per row from the store; none by default."""
        return {}

    def teacher_moments(self):
        """The std convention ("unbiased" / "population") when `loss` standardizes the teacher's logits (LS, the
        max-logit method), else None. On a lossy store (top-k, quantized, bfloat16) stage 3 then also reads stage
        1's exact per-row "mean" and "std" into `stats`, and `loss` standardizes with them, not the rebuild's own."""
        return None

    def check_sampled(self, temperature):
        """UserError unless this method, with its settings, trains on targets sampled at `temperature` (a sampled
        store); checked once when the store is opened, and again by `dense`. Most methods need all K logits."""
        raise refuse_sampled(self.name, temperature, "needs all K teacher logits")

    def loss(self, z_s, z_t, labels, stats, epoch):
        """L_distill (without CE and w_kd) of raw student / teacher logits (B, K), or of a sampled store's targets
        (kdcache.encodings.Sampled) where the method takes them; labels (B,); stats: per-row tensors by
        `statistics`' names (computed from z_t where missing); epoch counts from 1."""
        raise NotImplementedError

    def dense(self, z_t):
        """z_t, which this method needs as all K teacher logits: a sampled store's targets are refused (one line)."""
        if isinstance(z_t, Sampled):
            self.check_sampled(z_t.temperature)
            raise refuse_sampled(self.name, z_t.temperature, "needs all K teacher logits")
        return z_t


def refuse_sampled(method, temperature, why) -> UserError:
    """The error for a method (or its settings) that cannot train on targets sampled at `temperature`, naming
    those that can."""
    return UserError(f"method {method!r} {why}, which a sampled store (targets drawn at temperature "
                     f"{temperature:g}) does not hold: use kd with T: {temperature:g} (standardize: false), or ttm "
                     f"/ wttm with gamma: {1 / temperature:g}, or a store of another cache.encoding")
