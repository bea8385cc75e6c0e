"""The per-pair preference head: loss and its derivatives for every pair, one constexpr per loss.

Inputs per pair j: ``c``, ``r`` the chosen and rejected sequence log-probs and, with ``HAS_REF``,
``c_ref``, ``r_ref`` the reference model's.  With ``a = c - c_ref``, ``b = r - r_ref`` (``a = c``,
``b = r`` without a reference) and ``u = a - b``, as TRL's DPOTrainer writes them
(eps: label smoothing):

    SIGMOID    -(1-eps) log s(x) - eps log s(-x),          x = beta u - gamma    (DPO, cDPO, SimPO, CPO)
    ROBUST     (-(1-eps) log s(x) + eps log s(-x)) / (1 - 2 eps),  x = beta u
    EXO_PAIR   s(x) (log s(x) - log(1-eps)) + s(-x) (log s(-x) - log eps),  x = beta u
    HINGE      relu(1 - beta u)
    IPO        (u - 1 / (2 beta))^2
    SPPO_HARD  (a - 1 / (2 beta))^2 + (b + 1 / (2 beta))^2
    NCA_PAIR   -log s(beta a) - log s(-beta a) / 2 - log s(-beta b) / 2
    BCO_PAIR   -log s(beta a) - log s(-beta b)
    APO_ZERO   1 - s(beta a) + s(beta b)
    APO_DOWN   s(beta a) + 1 - s(beta u)
    DISCOPOP   -log s(x) (1 - m) + exp(-x) m,  x = beta u,  m = s(x / tau)
    ODDS_RATIO -beta log s(v),  v = (c - r) - (log(1 - e^c) - log(1 - e^r))          (ORPO)

The kernel writes the loss and ``d loss / d c``, ``d loss / d r`` (the reference is constant).
It is O(B); it is a kernel so the whole step stays on the device with no host round trip.
"""

import torch
import triton
import triton.language as tl

from .tiles import AotSpec

LOSS_IDS = {
    "sigmoid": 0, "robust": 1, "exo_pair": 2, "hinge": 3, "ipo": 4, "sppo_hard": 5,
    "nca_pair": 6, "apo_zero": 7, "apo_down": 8, "discopop": 9, "odds_ratio": 10,
    "bco_pair": 11,
}


@triton.jit
def sigmoid(x):
    # Through exp(-|x|), which never overflows (tl.sigmoid's exp(-x) does for x < -88).
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def log1p(t):
    # log(1 + t) for t > -1: 1 + t rounds away the digits of a small t (t = e^-20 gives log(1) = 0,
    # not 2e-9), so for |t| < 0.1 a degree-7 Taylor polynomial, accurate to 2e-8 relative.
    small = t * (1.0 - t * (1.0 / 2 - t * (1.0 / 3 - t * (1.0 / 4 - t * (1.0 / 5 - t * (1.0 / 6 - t * (1.0 / 7)))))))
    return tl.where(tl.abs(t) < 0.1, small, tl.log(1.0 + t))


@triton.jit
def log_sigmoid(x):
    # Stable for |x| up to fp32's range: exp(-|x|) never overflows, and log1p keeps the
    # relative accuracy of log s(x) ~ -e^-x for large x (a confident pair's loss).
    return tl.minimum(x, 0.0) - log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid_slope(x):
    # s(x) s(-x), written so that neither factor overflows.
    return sigmoid(x) * sigmoid(-x)


@triton.jit
def expm1(x):
    # exp(x) - 1 loses all its digits near 0; a degree-6 Taylor polynomial is exact to fp32 there.
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720))))))
    return tl.where(tl.abs(x) < 0.1, small, tl.exp(x) - 1.0)


@triton.jit
def log1m_exp(x):
    # log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Maechler's log1mexp).
    return tl.where(x > -0.6931471805599453, tl.log(-expm1(x)), tl.log(1.0 - tl.exp(x)))


@triton.jit
def preference_head_kernel(
    # pointers
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, loss_ptr, d_chosen_ptr, d_rejected_ptr,
    # sizes
    B,
    # scalars
    beta, gamma, label_smoothing, tau,
    # variants
    HAS_REF: tl.constexpr, LOSS: tl.constexpr,
    # tiles
    BLOCK_B: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offs < B
    c = tl.load(chosen_ptr + offs, mask=mask, other=-1.0)
    r = tl.load(rejected_ptr + offs, mask=mask, other=-1.0)
    a = c
    b = r
    if HAS_REF:
        a = c - tl.load(ref_chosen_ptr + offs, mask=mask, other=0.0)
        b = r - tl.load(ref_rejected_ptr + offs, mask=mask, other=0.0)
    u = a - b
    eps = label_smoothing
    if LOSS == 0:  # sigmoid
        x = beta * u - gamma
        loss = -(1.0 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)
        da = beta * (-(1.0 - eps) * sigmoid(-x) + eps * sigmoid(x))
        db = -da
    elif LOSS == 1:  # robust
        x = beta * u
        loss = (-(1.0 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1.0 - 2.0 * eps)
        da = beta * (-(1.0 - eps) * sigmoid(-x) - eps * sigmoid(x)) / (1.0 - 2.0 * eps)
        db = -da
    elif LOSS == 2:  # exo_pair
        x = beta * u
        log_keep = log1p(-eps)      # TRL's eps = 1e-3: log(1 - eps) would lose 5 digits
        log_eps = tl.log(eps)
        loss = sigmoid(x) * (log_sigmoid(x) - log_keep) + sigmoid(-x) * (log_sigmoid(-x) - log_eps)
        # d/dx: s(x) s(-x) (log s(x) - log s(-x) - log(1-eps) + log eps), and log s(x) - log s(-x) = x.
        da = beta * sigmoid_slope(x) * (x - log_keep + log_eps)
        db = -da
    elif LOSS == 3:  # hinge
        x = beta * u
        # maximum() drops a NaN operand by default (maxnum): a NaN margin would give a silent 0.
        loss = tl.maximum(1.0 - x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        da = tl.where(x < 1.0, -beta, 0.0)
        db = -da
    elif LOSS == 4:  # ipo
        d = u - 0.5 / beta
        loss = d * d
        da = 2.0 * d
        db = -da
    elif LOSS == 5:  # sppo_hard
        da_ = a - 0.5 / beta
        db_ = b + 0.5 / beta
        loss = da_ * da_ + db_ * db_
        da = 2.0 * da_
        db = 2.0 * db_
    elif LOSS == 6:  # nca_pair
        xa = beta * a
        xb = beta * b
        loss = -log_sigmoid(xa) - 0.5 * log_sigmoid(-xa) - 0.5 * log_sigmoid(-xb)
        da = beta * (-sigmoid(-xa) + 0.5 * sigmoid(xa))
        db = beta * 0.5 * sigmoid(xb)
    elif LOSS == 7:  # apo_zero
        loss = 1.0 - sigmoid(beta * a) + sigmoid(beta * b)
        da = -beta * sigmoid_slope(beta * a)
        db = beta * sigmoid_slope(beta * b)
    elif LOSS == 8:  # apo_down
        loss = sigmoid(beta * a) + 1.0 - sigmoid(beta * u)
        db = beta * sigmoid_slope(beta * u)
        da = beta * sigmoid_slope(beta * a) - db
    elif LOSS == 9:  # discopop
        x = beta * u
        m = sigmoid(x / tau)
        # exp(-x) m as exp(log s(x / tau) - x): finite wherever the product is (tau < 1).
        exp_part = tl.exp(log_sigmoid(x / tau) - x)
        dm = m * (1.0 - m) / tau
        loss = -log_sigmoid(x) * (1.0 - m) + exp_part
        dx = -sigmoid(-x) * (1.0 - m) + log_sigmoid(x) * dm - exp_part + exp_part * (1.0 - m) / tau
        da = beta * dx
        db = -da
    elif LOSS == 10:  # odds_ratio
        v = (c - r) - (log1m_exp(c) - log1m_exp(r))
        loss = -beta * log_sigmoid(v)
        dv = -beta * sigmoid(-v)
        # d v / d c = 1 / (1 - e^c) = -1 / expm1(c)
        da = -dv / expm1(c)
        db = dv / expm1(r)
    elif LOSS == 11:  # bco_pair
        xa = beta * a
        xb = beta * b
        loss = -log_sigmoid(xa) - log_sigmoid(-xb)
        da = -beta * sigmoid(-xa)
        db = beta * sigmoid(xb)
    else:
        # LOSS is a constexpr, so only the matching branch is compiled: an id with no branch stops
        # the compile (and the interpreter) here rather than computing some other loss.
        tl.static_assert(False, "preference_head_kernel: LOSS is not an id of pref_head.LOSS_IDS")
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(d_chosen_ptr + offs, da, mask=mask)
    tl.store(d_rejected_ptr + offs, db, mask=mask)


# O(B) work on a few floats per pair: one small block of pairs per program, and Triton's default 4
# warps (a whole program is 128 lanes, one pair each) -- nothing here is worth tuning.
BLOCK_B = 128
NUM_WARPS = 4


def preference_head_forward(chosen, rejected, ref_chosen, ref_rejected, *, loss, beta, gamma=0.0,
                            label_smoothing=0.0, tau=1.0):
    """Per-pair ``losses`` and ``d loss / d chosen``, ``d loss / d rejected`` (fp32, ``[B]`` each).

    ``chosen``, ``rejected`` (and ``ref_chosen``, ``ref_rejected``, or both None) are fp32 ``[B]``.
    """
    if loss not in LOSS_IDS:
        raise ValueError(f"preference_head_forward: unknown loss {loss!r}; known losses: {', '.join(LOSS_IDS)}")
    B = chosen.numel()
    losses, d_chosen, d_rejected = (torch.empty(B, device=chosen.device, dtype=torch.float32) for _ in range(3))
    has_ref = ref_chosen is not None
    preference_head_kernel[(triton.cdiv(B, BLOCK_B),)](
        chosen, rejected, ref_chosen if has_ref else chosen, ref_rejected if has_ref else rejected,
        losses, d_chosen, d_rejected,
        B,
        float(beta), float(gamma), float(label_smoothing), float(tau),
        HAS_REF=has_ref, LOSS=LOSS_IDS[loss],
        BLOCK_B=BLOCK_B, num_warps=NUM_WARPS,
    )
    return losses, d_chosen, d_rejected


def aot_specs() -> list[AotSpec]:
    """The head's ahead-of-time builds (``tiles.AotSpec``), fp32 whatever the model's dtype: every
    loss, with a reference model except ORPO, which has none."""
    pointers = dict.fromkeys(("chosen_ptr", "rejected_ptr", "ref_chosen_ptr", "ref_rejected_ptr", "loss_ptr",
                              "d_chosen_ptr", "d_rejected_ptr"), torch.float32)
    return [AotSpec("pref_head", loss, preference_head_kernel, pointers,
                    {"HAS_REF": loss != "odds_ratio", "LOSS": loss_id, "BLOCK_B": BLOCK_B}, {"num_warps": NUM_WARPS})
            for loss, loss_id in LOSS_IDS.items()]


__all__ = ["LOSS_IDS", "aot_specs", "preference_head_forward", "preference_head_kernel", "BLOCK_B", "NUM_WARPS"]
