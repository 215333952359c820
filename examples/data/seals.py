"""Seal tracks: southern elephant seals (``sesData.csv``) and a northern fur seal (``nfs_*.csv``).

The files are those of the momentuHMM package (https://github.com/bmcclintock/momentuHMM, folder
``manuscript/``, converted from .RData to CSV), read from ``DATA/seals/`` (see
:mod:`examples.data.common` for where ``DATA`` is). They are parsed with the :mod:`csv` module.

**Time steps are locations.** As in momentuHMM, time step ``t`` of a track is its ``t``-th
location, and carries

- the *step length* ``step[t]``: the distance from location ``t`` to location ``t + 1`` (missing
  at the last location);
- the *turning angle* ``angle[t]``: the change of heading at location ``t``, from the heading in
  which the animal arrived (step ``t - 1``) to the heading in which it leaves (step ``t``),
  wrapped to :math:`(-\\pi, \\pi]`; headings are clockwise from north, so a positive angle is a
  turn to the right. It is missing at the first and last locations and next to a zero-length
  step (no heading);
- for the fur seal, the hourly foraging-dive count ``dive[t]``.

Distances and headings:

- longitude/latitude (``sesData.csv``): great-circle distance by the haversine formula on a sphere
  of radius :data:`EARTH_RADIUS_KM` (the mean Earth radius), in km. The leaving heading is the
  initial bearing of step ``t`` at location ``t``; the arriving heading is the *final* bearing of
  step ``t - 1`` at location ``t`` (the bearing from ``t`` back to ``t - 1``, plus :math:`\\pi`).
- projected x/y in metres (``nfs_locations.csv``): converted to km; Euclidean distance, heading
  ``atan2(dx, dy)``.

**The fur seal's two files.** ``nfs_foragedives.csv`` holds one row per hour (227 rows, times
``17:49:25``, ``18:49:25``, ...) with the number of foraging dives in that hour (0-16; the data
README calls them indicators, but they are counts). ``nfs_locations.csv`` holds 241 irregularly
timed Argos/GPS fixes. The track is *regularised to the dive times*: the position at each hourly
dive time is linearly interpolated in time between the two fixes that bracket it (no smoothing, no
error model, so the fixes' location errors stay in). A position that lies in a gap of more than
``max_gap_hours`` between consecutive fixes (3 h by default; the longest gap is 6.7 h) is marked
unsupported, and every step length and turning angle that uses it is missing (masked): inside a
long gap interpolation would only invent straight, evenly spaced steps. Dive times outside the
span of the fixes would be unsupported too (none are). Each hour keeps its dive count.

Example::

    >>> ses = load_ses()  # doctest: +SKIP
    >>> ses.step.shape, int(ses.lengths.sum())  # doctest: +SKIP
    (torch.Size([15, 603]), 7353)
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch

from .common import SOURCES, DataError, data_file

__all__ = [
    "EARTH_RADIUS_KM",
    "NFS_DIVES",
    "NFS_LOCATIONS",
    "SEALS_SOURCE",
    "SES_FILE",
    "Tracks",
    "great_circle_km",
    "load_nfs",
    "load_ses",
    "movement_lonlat",
    "movement_xy",
    "wrap_angle",
]

#: The radius (km) of the sphere on which longitude/latitude steps are measured (IUGG mean radius).
EARTH_RADIUS_KM = 6371.0088
#: The southern elephant seal file under ``seals/``.
SES_FILE = "sesData.csv"
#: The northern fur seal's location fixes under ``seals/``.
NFS_LOCATIONS = "nfs_locations.csv"
#: The northern fur seal's hourly foraging-dive counts under ``seals/``.
NFS_DIVES = "nfs_foragedives.csv"
#: Where the seal files come from.
SEALS_SOURCE = SOURCES["seals"]
#: Cell values read as missing (dive counts only; coordinates and times must be present).
_MISSING = ("", "NA", "NaN", "nan")


@dataclass(frozen=True)
class Tracks:
    """Animal tracks padded to a common length; time step ``t`` of a track is its ``t``-th
    location (see the module docstring for what each step carries).

    ``N`` is the number of individuals and ``T`` the longest track's number of locations. Every
    float tensor is zero where its mask is false (past a track's end, or missing).

    :ivar ids: the individuals' IDs, in order of first appearance in the file.
    :ivar coords: ``"lonlat"`` (``position`` in degrees longitude, latitude) or ``"xy"``
        (``position`` in km, projected).
    :ivar position: ``(N, T, 2)`` the locations.
    :ivar hours: ``(N, T)`` hours since the track's first location.
    :ivar step: ``(N, T)`` step lengths in km, from location ``t`` to ``t + 1``.
    :ivar angle: ``(N, T)`` turning angles at location ``t`` in radians, in :math:`(-\\pi, \\pi]`.
    :ivar lengths: ``(N,)`` long, each track's number of locations.
    :ivar mask: ``(N, T)`` bool, ``t < lengths[n]``.
    :ivar step_mask: ``(N, T)`` bool, the step length is observed.
    :ivar angle_mask: ``(N, T)`` bool, the turning angle is observed.
    :ivar dive: ``(N, T)`` hourly foraging-dive counts, or ``None`` (no dive data).
    :ivar dive_mask: ``(N, T)`` bool, the dive count is observed, or ``None``.
    :ivar files: the files read.
    """

    ids: tuple[str, ...]
    coords: str
    position: torch.Tensor
    hours: torch.Tensor
    step: torch.Tensor
    angle: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    step_mask: torch.Tensor
    angle_mask: torch.Tensor
    dive: torch.Tensor | None = None
    dive_mask: torch.Tensor | None = None
    files: tuple[str, ...] = ()

    @property
    def num_individuals(self) -> int:
        """``N``."""
        return len(self.ids)

    @property
    def max_length(self) -> int:
        """``T``, the padded number of time steps."""
        return int(self.step.shape[1])

    def select(self, individuals: Sequence[int] | None = None, max_length: int | None = None
               ) -> Tracks:
        """A subset: the given individuals (default all), each cut to its first ``max_length``
        time steps (default all). A kept step's length and angle stay observed even where the
        cut drops the location they reach (they are data of the kept step)."""
        idx = list(range(self.num_individuals)) if individuals is None else list(individuals)
        if not idx:
            raise ValueError("select(): no individuals selected")
        if max_length is not None and max_length < 1:
            raise ValueError(f"select(): max_length must be >= 1, got {max_length}")
        lengths = self.lengths[idx]
        if max_length is not None:
            lengths = lengths.clamp(max=max_length)
        t = int(lengths.max())

        def cut(x: torch.Tensor) -> torch.Tensor:
            return x[idx, :t].clone()

        return replace(
            self, ids=tuple(self.ids[i] for i in idx), position=cut(self.position),
            hours=cut(self.hours), step=cut(self.step), angle=cut(self.angle), lengths=lengths,
            mask=torch.arange(t, device=lengths.device) < lengths[:, None],
            step_mask=cut(self.step_mask) & (torch.arange(t, device=lengths.device)
                                             < lengths[:, None]),
            angle_mask=cut(self.angle_mask) & (torch.arange(t, device=lengths.device)
                                               < lengths[:, None]),
            dive=None if self.dive is None else cut(self.dive),
            dive_mask=None if self.dive_mask is None else cut(self.dive_mask))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> Tracks:
        """The tracks on ``device``, with float tensors cast to ``dtype`` (default: unchanged)."""

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

        def must(x: torch.Tensor) -> torch.Tensor:
            out = move(x)
            assert out is not None
            return out

        return replace(self, position=must(self.position), hours=must(self.hours),
                       step=must(self.step), angle=must(self.angle), lengths=must(self.lengths),
                       mask=must(self.mask), step_mask=must(self.step_mask),
                       angle_mask=must(self.angle_mask), dive=move(self.dive),
                       dive_mask=move(self.dive_mask))


# ----------------------------------------------------------------------------------------------
# geometry


def wrap_angle(a: torch.Tensor) -> torch.Tensor:
    """Angles wrapped to :math:`(-\\pi, \\pi]`: :math:`\\pi - ((\\pi - a) \\bmod 2\\pi)`."""
    return math.pi - torch.remainder(math.pi - a, 2 * math.pi)


def great_circle_km(lon1: torch.Tensor, lat1: torch.Tensor, lon2: torch.Tensor,
                    lat2: torch.Tensor) -> torch.Tensor:
    """Haversine great-circle distance (km) between points given in degrees (broadcasting).

    .. math:: d = 2R \\arcsin\\sqrt{\\sin^2\\tfrac{\\phi_2-\\phi_1}{2}
              + \\cos\\phi_1\\cos\\phi_2\\sin^2\\tfrac{\\lambda_2-\\lambda_1}{2}}
    """
    p1, p2 = torch.deg2rad(lat1), torch.deg2rad(lat2)
    dl = torch.deg2rad(lon2 - lon1)
    h = torch.sin((p2 - p1) / 2) ** 2 + torch.cos(p1) * torch.cos(p2) * torch.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(h.clamp(0, 1).sqrt())


def _bearing(lon1: torch.Tensor, lat1: torch.Tensor, lon2: torch.Tensor, lat2: torch.Tensor
             ) -> torch.Tensor:
    """The initial great-circle bearing (radians clockwise from north) from point 1 to 2."""
    p1, p2 = torch.deg2rad(lat1), torch.deg2rad(lat2)
    dl = torch.deg2rad(lon2 - lon1)
    north = torch.cos(p1) * torch.sin(p2) - torch.sin(p1) * torch.cos(p2) * torch.cos(dl)
    return torch.atan2(torch.sin(dl) * torch.cos(p2), north)


def _turns(step: torch.Tensor, leave: torch.Tensor, arrive: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-step values of one track to per-location ones (NaN where missing).

    :param step: ``(n - 1,)`` step lengths; ``leave``, ``arrive``: ``(n - 1,)`` headings of each
        step at its start and at its end.
    :return: ``(step, angle)``, each ``(n,)``.
    """
    nan = step.new_full((1,), math.nan)
    angle = wrap_angle(leave[1:] - arrive[:-1])
    moving = (step[1:] > 0) & (step[:-1] > 0)
    angle = torch.where(moving, angle, torch.full_like(angle, math.nan))
    return torch.cat([step, nan]), torch.cat([nan, angle, nan]) if len(step) else nan


def movement_lonlat(lon: torch.Tensor, lat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step lengths (km) and turning angles (radians) of one track given in degrees.

    :param lon: ``(n,)`` longitudes; ``lat``: ``(n,)`` latitudes.
    :return: ``(step, angle)``, each ``(n,)``: ``step[t]`` from location ``t`` to ``t + 1``
        (NaN at ``t = n - 1``); ``angle[t]`` the turn at location ``t`` in
        :math:`(-\\pi, \\pi]`, positive to the right (NaN at the ends and next to a zero step).
    """
    a = (lon[:-1], lat[:-1], lon[1:], lat[1:])
    step = great_circle_km(*a)
    leave = _bearing(*a)
    arrive = wrap_angle(_bearing(lon[1:], lat[1:], lon[:-1], lat[:-1]) + math.pi)
    return _turns(step, leave, arrive)


def movement_xy(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step lengths (units of ``x``, ``y``) and turning angles of one projected track.

    As :func:`movement_lonlat`, with Euclidean steps and headings ``atan2(dx, dy)`` (clockwise
    from the ``y`` axis, i.e. north).
    """
    dx, dy = x[1:] - x[:-1], y[1:] - y[:-1]
    heading = torch.atan2(dx, dy)
    return _turns(torch.hypot(dx, dy), heading, heading)


# ----------------------------------------------------------------------------------------------
# parsing


def _read_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """The rows of a CSV file with a header, as ``(line number, {column: cell})``.

    :raises DataError: on a missing column or a row with the wrong number of cells (the message
        names the file and line).
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{str(path)!r} is empty; expected a header with columns "
                            f"{', '.join(required)}") from None
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{str(path)!r}, line 1: the header {header} lacks the column(s) "
                            f"{', '.join(missing)}")
        rows = []
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise DataError(f"{str(path)!r}, line {reader.line_num}: {len(cells)} cells, "
                                f"expected {len(header)} ({', '.join(header)})")
            rows.append((reader.line_num, {h: c.strip() for h, c in zip(header, cells,
                                                                       strict=True)}))
    if not rows:
        raise DataError(f"{str(path)!r} has a header but no data rows")
    return rows


def _number(path: Path, line: int, column: str, cell: str, missing_ok: bool = False) -> float:
    if missing_ok and cell in _MISSING:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{str(path)!r}, line {line}: column {column!r} is {cell!r}, expected a "
                        "finite number")
    return value


def _time(path: Path, line: int, column: str, cell: str) -> datetime:
    try:
        return datetime.fromisoformat(cell)
    except ValueError:
        raise DataError(f"{str(path)!r}, line {line}: column {column!r} is {cell!r}, expected a "
                        "date-time such as '2014-02-11 10:34:58'") from None


def _by_individual(path: Path, rows: list[tuple[int, dict[str, str]]], time_column: str
                   ) -> dict[str, list[tuple[datetime, int, dict[str, str]]]]:
    """Rows grouped by ``ID`` (in order of first appearance), each group sorted by time.

    :raises DataError: if an individual has two rows at the same time.
    """
    groups: dict[str, list[tuple[datetime, int, dict[str, str]]]] = {}
    for line, row in rows:
        if not row["ID"]:
            raise DataError(f"{str(path)!r}, line {line}: empty ID")
        groups.setdefault(row["ID"], []).append(
            (_time(path, line, time_column, row[time_column]), line, row))
    for ident, group in groups.items():
        group.sort(key=lambda r: r[0])
        for (t1, l1, _), (t2, l2, _) in zip(group, group[1:], strict=False):
            if t1 == t2:
                raise DataError(f"{str(path)!r}, lines {l1} and {l2}: individual {ident!r} has "
                                f"two rows at {t1}")
    return groups


def _pad(values: list[torch.Tensor], t: int, dtype: torch.dtype) -> torch.Tensor:
    """Stack 1-D (or ``(n, 2)``) float64 tensors into ``(N, t, ...)`` zero-padded, NaN -> 0."""
    out = torch.zeros((len(values), t) + tuple(values[0].shape[1:]), dtype=torch.float64)
    for i, v in enumerate(values):
        out[i, :len(v)] = torch.nan_to_num(v, nan=0.0)
    return out.to(dtype)


def _tracks(ids: list[str], coords: str, positions: list[torch.Tensor],
            hours: list[torch.Tensor], steps: list[torch.Tensor], angles: list[torch.Tensor],
            dives: list[torch.Tensor] | None, files: tuple[str, ...], dtype: torch.dtype
            ) -> Tracks:
    lengths = torch.tensor([len(p) for p in positions], dtype=torch.long)
    t = int(lengths.max())
    inside = torch.arange(t) < lengths[:, None]

    def observed(values: list[torch.Tensor]) -> torch.Tensor:
        m = torch.zeros(len(values), t, dtype=torch.bool)
        for i, v in enumerate(values):
            m[i, :len(v)] = ~torch.isnan(v)
        return m & inside

    return Tracks(
        ids=tuple(ids), coords=coords, position=_pad(positions, t, dtype),
        hours=_pad(hours, t, dtype), step=_pad(steps, t, dtype), angle=_pad(angles, t, dtype),
        lengths=lengths, mask=inside, step_mask=observed(steps), angle_mask=observed(angles),
        dive=None if dives is None else _pad(dives, t, dtype),
        dive_mask=None if dives is None else observed(dives), files=files)


def _hours(times: Sequence[datetime]) -> torch.Tensor:
    return torch.tensor([(s - times[0]).total_seconds() / 3600 for s in times],
                        dtype=torch.float64)


def load_ses(data_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None
             ) -> Tracks:
    """The 15 southern elephant seal tracks of ``seals/sesData.csv`` (7,353 locations, one every
    9.6 hours), with great-circle step lengths (km) and turning angles.

    :param data_dir: the data folder (see :func:`~examples.data.common.data_dir`); default
        ``$PLATED_DATA``.
    :param dtype: the floating dtype of the returned tensors (default: torch's default dtype).
        Geometry is computed in float64 either way.
    :return: :class:`Tracks` with ``coords="lonlat"``, ``N = 15``, ``T = 603``, no dive data.
    :raises DataError: for a missing folder or file, or a malformed row (the message names the
        file and line): a missing column, a wrong number of cells, a coordinate that is not a
        finite number (or a latitude outside [-90, 90]), an unparsable date, or two rows of one
        seal at the same time.
    """
    dtype = dtype or torch.get_default_dtype()
    path = data_file(data_dir, "seals", SES_FILE)
    rows = _read_rows(path, ("ID", "lon", "lat", "date"))
    groups = _by_individual(path, rows, "date")
    ids, positions, hours, steps, angles = [], [], [], [], []
    for ident, group in groups.items():
        lon_lat = []
        for _, line, row in group:
            lon = _number(path, line, "lon", row["lon"])
            lat = _number(path, line, "lat", row["lat"])
            if not -90 <= lat <= 90:
                raise DataError(f"{str(path)!r}, line {line}: latitude {lat} is outside "
                                "[-90, 90]")
            lon_lat.append((lon, lat))
        pos = torch.tensor(lon_lat, dtype=torch.float64)
        step, angle = movement_lonlat(pos[:, 0], pos[:, 1])
        ids.append(ident)
        positions.append(pos)
        hours.append(_hours([g[0] for g in group]))
        steps.append(step)
        angles.append(angle)
    return _tracks(ids, "lonlat", positions, hours, steps, angles, None, (str(path),), dtype)


def load_nfs(data_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None,
             max_gap_hours: float = 3.0) -> Tracks:
    """The northern fur seal of ``seals/nfs_locations.csv`` and ``seals/nfs_foragedives.csv``,
    regularised to its hourly dive times (see the module docstring).

    :param data_dir: the data folder; default ``$PLATED_DATA``.
    :param dtype: the floating dtype of the returned tensors (default: torch's default dtype).
    :param max_gap_hours: a position interpolated inside a gap between fixes longer than this is
        unsupported: the step lengths and turning angles that use it are masked.
    :return: :class:`Tracks` with ``coords="xy"`` (km), one time step per hourly dive row
        (``N = 1``, ``T = 227``), ``dive`` the hourly foraging-dive counts.
    :raises DataError: for a missing folder or file or a malformed row (the message names the
        file and line), or an individual with dive rows but no location fixes.
    """
    if max_gap_hours <= 0:
        raise ValueError(f"max_gap_hours must be positive, got {max_gap_hours}")
    dtype = dtype or torch.get_default_dtype()
    loc_path = data_file(data_dir, "seals", NFS_LOCATIONS)
    dive_path = data_file(data_dir, "seals", NFS_DIVES)
    fixes = _by_individual(loc_path, _read_rows(loc_path, ("ID", "time", "x", "y")), "time")
    dive_rows = _by_individual(dive_path, _read_rows(dive_path, ("ID", "time", "dive")), "time")
    ids, positions, hours, steps, angles, dives = [], [], [], [], [], []
    for ident, group in dive_rows.items():
        if ident not in fixes:
            raise DataError(f"{str(dive_path)!r}: individual {ident!r} has dive rows but "
                            f"{str(loc_path)!r} has no location fixes for it")
        fix = fixes[ident]
        fix_xy = torch.tensor([[_number(loc_path, line, "x", row["x"]),
                                _number(loc_path, line, "y", row["y"])]
                               for _, line, row in fix], dtype=torch.float64) / 1000
        if len(fix) < 2:
            raise DataError(f"{str(loc_path)!r}: individual {ident!r} has {len(fix)} location "
                            "fix(es); at least 2 are needed to interpolate its track")
        fix_h = torch.tensor([(f[0] - group[0][0]).total_seconds() / 3600 for f in fix],
                             dtype=torch.float64)
        dive = torch.tensor([_number(dive_path, line, "dive", row["dive"], missing_ok=True)
                             for _, line, row in group], dtype=torch.float64)
        bad = ~torch.isnan(dive) & ((dive < 0) | (dive != dive.floor()))
        if bad.any():
            line = group[int(bad.nonzero()[0, 0])][1]
            raise DataError(f"{str(dive_path)!r}, line {line}: the dive count must be a "
                            "nonnegative integer")
        h = _hours([g[0] for g in group])
        xy, supported = _interpolate(fix_h, fix_xy, h, max_gap_hours)
        step, angle = movement_xy(xy[:, 0], xy[:, 1])
        step_ok = supported[:-1] & supported[1:]
        step = torch.where(torch.cat([step_ok, step_ok.new_zeros(1)]), step, math.nan)
        angle_ok = torch.cat([step_ok.new_zeros(1), step_ok[:-1] & step_ok[1:],
                              step_ok.new_zeros(1)])
        angle = torch.where(angle_ok, angle, math.nan)
        ids.append(ident)
        positions.append(xy)
        hours.append(h)
        steps.append(step)
        angles.append(angle)
        dives.append(dive)
    return _tracks(ids, "xy", positions, hours, steps, angles, dives,
                   (str(loc_path), str(dive_path)), dtype)


def _interpolate(fix_h: torch.Tensor, fix_xy: torch.Tensor, h: torch.Tensor, max_gap: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions at times ``h`` (hours) linearly interpolated between fixes.

    :param fix_h: ``(m,)`` increasing fix times; ``fix_xy``: ``(m, 2)`` their positions.
    :param h: ``(n,)`` the times wanted.
    :return: ``(xy, supported)``: ``(n, 2)`` positions (the nearest fix outside the fixes' span)
        and ``(n,)`` bool, the time lies within the span, in a gap of at most ``max_gap``.
    """
    right = torch.searchsorted(fix_h, h).clamp(1, len(fix_h) - 1)
    left = right - 1
    span = fix_h[right] - fix_h[left]
    w = ((h - fix_h[left]) / span).clamp(0, 1).unsqueeze(-1)
    xy = (1 - w) * fix_xy[left] + w * fix_xy[right]
    supported = (h >= fix_h[0]) & (h <= fix_h[-1]) & (span <= max_gap)
    return xy, supported
