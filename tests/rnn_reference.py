"""Plain loops written from the papers' equations, for ``m = numpy`` (values, float64) or ``m = jax.numpy``
(gradients by ``jax.grad``). Dense per-gate matrices: ``Wx [d_in, K, H]``, ``b [K, H]``, ``R [K, H, H]``
(``h @ R[k]``), so they share nothing with seqjax's head-wise layout."""

import numpy as np


def to_dense(params, m=np):
    """seqjax head-wise params -> dense per-gate matrices (block-diagonal ``R``)."""
    W, b = params["W"], params["b"]
    d_in, g, k, d = W.shape
    out = {"Wx": m.reshape(m.transpose(W, (0, 2, 1, 3)), (d_in, k, g * d)),
           "b": m.reshape(m.transpose(b, (1, 0, 2)), (k, g * d))}
    if "R" in params:
        R = params["R"]
        zero = m.zeros((d, d))
        out["R"] = m.stack([
            m.concatenate([m.concatenate([R[gi, :, kk, :] if gi == gj else zero for gj in range(g)], axis=1)
                           for gi in range(g)], axis=0)
            for kk in range(k)])
    for name in ("peep", "tau", "bhn"):
        if name in params:
            v = params[name]
            out[name] = m.reshape(m.transpose(v, (1, 0, 2)), (3, g * d)) if name == "peep" else m.reshape(v, (g * d,))
    for name in ("A", "W1", "W2", "h2"):
        if name in params:
            out[name] = params[name]
    return out


def sig(z, m):
    return 1.0 / (1.0 + m.exp(-z))


def reference(kind, p, x, h0=None, m=np):
    """Returns ``(y [b, t, H], state list)``; ``h0`` is the ``[b, S, H]`` carry."""
    b, t, _ = x.shape
    pre_x = m.einsum("btd,dkh->btkh", x, p["Wx"]) + p["b"][None, None]
    hid = pre_x.shape[-1]
    S = {"lstm": 2, "slstm": 4}.get(kind, 1)
    st = [m.zeros((b, hid)) for _ in range(S)] if h0 is None else [h0[:, i] for i in range(S)]
    ys = []
    for ti in range(t):
        xt = pre_x[:, ti]
        h = st[0]
        if kind == "shplrnn":
            pre = h @ p["W2"].T
            relu = lambda v: m.maximum(v, 0.0)
            h = p["A"][None] * h + (relu(pre + p["h2"][None]) - relu(pre)) @ p["W1"].T + xt[:, 0]
            st = [h]
        else:
            rec = [h @ p["R"][k] for k in range(xt.shape[1])]
            if kind == "rnn_tanh":
                st = [m.tanh(xt[:, 0] + rec[0])]
            elif kind == "rnn_relu":
                st = [m.maximum(xt[:, 0] + rec[0], 0.0)]
            elif kind == "leaky":
                tau = m.maximum(p["tau"], 1.0)[None]
                st = [(1 - 1 / tau) * h + (1 / tau) * m.maximum(xt[:, 0] + rec[0], 0.0)]
            elif kind == "lstm":
                c = st[1]
                pe = p.get("peep", m.zeros((3, hid)))
                i = sig(xt[:, 0] + rec[0] + pe[0][None] * c, m)
                f = sig(xt[:, 1] + rec[1] + pe[1][None] * c, m)
                c = f * c + i * m.tanh(xt[:, 2] + rec[2])
                o = sig(xt[:, 3] + rec[3] + pe[2][None] * c, m)
                st = [o * m.tanh(c), c]
            elif kind == "gru":
                r = sig(xt[:, 0] + rec[0], m)
                z = sig(xt[:, 1] + rec[1], m)
                n = m.tanh(xt[:, 2] + r * (rec[2] + p["bhn"][None]))
                st = [(1 - z) * n + z * h]
            elif kind == "slstm":
                _, c, n, mm = st
                it, ft, zt, ot = (xt[:, k] + rec[k] for k in range(4))
                logf = -m.log1p(m.exp(-ft))
                m_new = m.where(n == 0, it, m.maximum(it, logf + mm))
                i, f = m.exp(it - m_new), m.exp(logf + mm - m_new)
                c = f * c + i * m.tanh(zt)
                n = f * n + i
                st = [sig(ot, m) * c / n, c, n, m_new]
        ys.append(st[0])
    return m.stack(ys, axis=1), m.stack(st, axis=1)
