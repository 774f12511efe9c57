"""How one write to a RAID-5 volume reads and computes, stripe by stripe
(the layout itself is vmd/raid5.py)."""

from __future__ import annotations

from typing import Any

from .raid5_rebuild import xor_into

# (column index, offset in the column, length)
Piece = tuple[int, int, int]


class WritePlan:
    """The reads and the computation of one write, stripe by stripe.

    Per stripe, the write touches data units over in-unit ranges; `span` is
    the union of those ranges, the only part of the parity unit that changes.
    - full stripe: parity from the new data, no reads;
    - read-modify-write: read the touched old data and the old parity span;
      parity ^= old ^ new;
    - reconstruct-write: read the span of the data units the write does not
      cover; parity = XOR of the new span;
    - degraded (one column lacking): read the span of every other column,
      rebuild the lacking one's old span (XOR), then as reconstruct-write.
    The cheaper of the two in bytes read is taken when all columns are in.
    """

    def __init__(self, vol: Any, *, count: bool = True):
        self.vol = vol
        self.count = count  # in the volume's method_counts (not a prefetch's look ahead)
        self.reads: list[Piece] = []
        self.stripes: list[dict[str, Any]] = []

    def add_stripe(self, s: int, off: int, data: memoryview, lacking: int | None) -> None:
        vol = self.vol
        su, base = vol.su, s * vol.width
        lo, hi = max(off, base), min(off + len(data), base + vol.width)
        units: dict[int, tuple[int, int, memoryview]] = {}  # k → (ua, ub, new bytes)
        pos = lo
        while pos < hi:
            k, ua = divmod(pos - base, su)
            ub = min(su, ua + hi - pos)
            units[k] = (ua, ub, data[pos - off:pos - off + ub - ua])
            pos += ub - ua
        pa = min(u[0] for u in units.values())
        pb = max(u[1] for u in units.values())
        span = pb - pa
        ndata = vol.ncol - 1
        covering = [k for k in range(ndata) if k in units
                    and units[k][0] <= pa and units[k][1] >= pb]
        rcw_bytes = (ndata - len(covering)) * span
        rmw_bytes = sum(u[1] - u[0] for u in units.values()) + span
        pcol = vol.parity_col(s)
        st: dict[str, Any] = {"s": s, "units": units, "pa": pa, "pb": pb, "lacking": lacking,
                              "first": len(self.reads)}
        col_at = s * su + pa
        if lacking is not None:
            st["method"] = "degraded"
            st["cols"] = [c for c in range(vol.ncol) if c != lacking]
            self.reads.extend((c, col_at, span) for c in st["cols"])
        elif rcw_bytes == 0:
            st["method"] = "full"
        elif rmw_bytes < rcw_bytes:
            st["method"] = "rmw"
            self.reads.extend((vol.data_col(s, k), s * su + u[0], u[1] - u[0])
                              for k, u in sorted(units.items()))
            self.reads.append((pcol, col_at, span))
        else:
            st["method"] = "rcw"
            st["cols"] = [vol.data_col(s, k) for k in range(ndata) if k not in covering]
            self.reads.extend((c, col_at, span) for c in st["cols"])
        if self.count:
            vol.method_counts[st["method"]] += 1
        self.stripes.append(st)

    def compute(self, got: list[Any]) -> list[tuple[int, int, Any]]:
        vol = self.vol
        su = vol.su
        writes: list[tuple[int, int, Any]] = []
        for st in self.stripes:
            s, units, pa, pb = st["s"], st["units"], st["pa"], st["pb"]
            span = pb - pa
            pcol = vol.parity_col(s)
            if st["method"] == "rmw":
                parity = bytearray(got[st["first"] + len(units)])
                for i, (k, (ua, ub, new)) in enumerate(sorted(units.items())):
                    view = memoryview(parity)[ua - pa:ub - pa]
                    xor_into(view, got[st["first"] + i])
                    xor_into(view, new)
            else:
                old: dict[int, Any] = {}
                for i, c in enumerate(st.get("cols", [])):
                    old[c] = got[st["first"] + i]
                if st["method"] == "degraded":
                    # The lacking column's old span: the XOR of all the others.
                    lost = bytearray(old[st["cols"][0]])
                    for c in st["cols"][1:]:
                        xor_into(lost, old[c])
                    old[st["lacking"]] = lost
                parity = bytearray(span)
                for k in range(vol.ncol - 1):
                    c = vol.data_col(s, k)
                    if k in units:
                        ua, ub, new = units[k]
                        if ua <= pa and ub >= pb:
                            xor_into(parity, new)
                            continue
                        unit = bytearray(old[c])
                        unit[ua - pa:ub - pa] = new
                        xor_into(parity, unit)
                    else:
                        xor_into(parity, old[c])
            for k, (ua, ub, new) in units.items():
                c = vol.data_col(s, k)
                if vol._writable(c):
                    writes.append((c, s * su + ua, new))
            if vol._writable(pcol):
                writes.append((pcol, s * su + pa, parity))
        return writes


def edge_plan(vol: Any, off: int, data: memoryview, *, count: bool) -> WritePlan:
    """The plan of the stripes a write of `data` at `off` covers only in
    part (at most its first and its last), every column in: what a write
    over whole stripes reads and computes besides them, and what a write
    about to wait for its range lock can read ahead (vmd/raid5_ahead.py)."""
    w, end = vol.width, off + len(data)
    plan = WritePlan(vol, count=count)
    for s in sorted({off // w, (end - 1) // w}):
        if off > s * w or end < (s + 1) * w:
            plan.add_stripe(s, off, data, None)
    return plan


def full_stripes(vol: Any, off: int, data: memoryview) -> list[tuple[int, int, Any]]:
    """The column writes of a write of whole stripes (`off` and its length
    multiples of the stripe width), every column in: each stripe's data units
    as they are and their XOR as parity. What WritePlan computes for them,
    without its per-stripe dicts (a 1 MiB write is 8 stripes of 64 KiB units
    with 3 columns; the plan's bookkeeping cost the event loop about as much
    as the XOR)."""
    su, width, ndata = vol.su, vol.width, vol.ncol - 1
    writes: list[tuple[int, int, Any]] = []
    for i in range(len(data) // width):
        s = off // width + i
        units = [data[i * width + k * su:i * width + (k + 1) * su] for k in range(ndata)]
        parity = bytearray(units[0])
        for u in units[1:]:
            xor_into(parity, u)
        at = s * su
        writes.extend((vol.data_col(s, k), at, units[k]) for k in range(ndata))
        writes.append((vol.parity_col(s), at, parity))
    vol.method_counts["full"] += len(data) // width
    return writes
