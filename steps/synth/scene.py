"""Astronomical scene for synthetic exposures: sky, stars and galaxies, and pointing.

Sources live in full-frame DMS detector pixel coordinates (0-based, pixel ``i`` spans
``[i-0.5, i+0.5]``), fluxes in e-/s (total, before QE).  :func:`render_rate` turns a
source list into an e-/s image for any window of the detector.

Designed for dithered multi-exposure fields later: a field can be defined on the sky
(:class:`SkySource`, RA/Dec in degrees, sizes in arcsec) and projected into each
exposure's pixels with :func:`project` and any ``world_to_pixel`` callable — for now the
simple gnomonic :class:`TangentPlaneWCS` built from the exposure's pointing keywords;
stage 2 can substitute the distortion-aware WCS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
from scipy.special import erf

from .detector import FULL_SIZE, REF_BORDER, DetectorInfo, Subarray

# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A point source or galaxy in detector pixels.

    kind: 'star' (Gaussian PSF of width ``sigma`` px) or 'galaxy' (Sersic profile with
    half-light radius ``r_eff`` px, index ``n``, axis ratio ``q``, position angle
    ``theta`` [rad, from +x towards +y]).  ``flux`` is the total rate in e-/s.
    """

    kind: str
    x: float
    y: float
    flux: float
    sigma: float = 0.9
    r_eff: float = 0.0
    n: float = 1.0
    q: float = 1.0
    theta: float = 0.0
    id: int = 0


@dataclass(frozen=True)
class SkySource:
    """A source on the sky (degrees); sizes in arcsec, flux in e-/s for this filter."""

    kind: str
    ra: float
    dec: float
    flux: float
    fwhm: float = 0.066
    r_eff: float = 0.0
    n: float = 1.0
    q: float = 1.0
    pa: float = 0.0      # deg, east of north
    id: int = 0


@dataclass
class Scene:
    """Uniform sky background plus discrete sources."""

    sky: float = 3.0                      # e-/s/pixel
    sources: list[Source] = field(default_factory=list)


def random_scene(seed: int, sub: Subarray, *, sky: float = 3.0, density: float = 2.5e-4,
                 star_fraction: float = 0.5, flux_range: tuple[float, float] = (20.0, 3e5),
                 n_bright: int = 1, psf_sigma: float = 0.9) -> Scene:
    """Seeded stars and galaxies placed inside the light-sensitive part of ``sub``.

    Number of sources = density x area (at least 3); fluxes log-uniform in
    ``flux_range`` e-/s; ``n_bright`` extra stars at 1e6 e-/s saturate within a frame or two.
    """
    rng = np.random.default_rng([int(seed) % (1 << 32), 0x5C3E, sub.xstart, sub.ystart])
    lo_x = max(sub.x0, REF_BORDER) + 3
    hi_x = min(sub.x0 + sub.xsize, FULL_SIZE - REF_BORDER) - 3
    lo_y = max(sub.y0, REF_BORDER) + 3
    hi_y = min(sub.y0 + sub.ysize, FULL_SIZE - REF_BORDER) - 3
    area = max(hi_x - lo_x, 1) * max(hi_y - lo_y, 1)
    count = max(3, int(round(density * area)))
    sources = []
    for i in range(count + n_bright):
        x = rng.uniform(lo_x, hi_x)
        y = rng.uniform(lo_y, hi_y)
        if i >= count:
            sources.append(Source("star", x, y, 1.0e6, sigma=psf_sigma, id=i + 1))
            continue
        flux = float(np.exp(rng.uniform(np.log(flux_range[0]), np.log(flux_range[1]))))
        if rng.uniform() < star_fraction:
            sources.append(Source("star", x, y, flux, sigma=psf_sigma, id=i + 1))
        else:
            sources.append(Source("galaxy", x, y, flux, r_eff=float(rng.uniform(1.5, 6.0)),
                                  n=float(rng.choice([1.0, 1.0, 4.0])),
                                  q=float(rng.uniform(0.35, 1.0)),
                                  theta=float(rng.uniform(0, np.pi)), id=i + 1))
    return Scene(sky=sky, sources=sources)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

def _gauss_1d(centre: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    """Fraction of a unit 1-D Gaussian falling in pixels lo..hi-1 (pixel-integrated)."""
    edges = (np.arange(lo, hi + 1) - 0.5 - centre) / (sigma * math.sqrt(2.0))
    return 0.5 * np.diff(erf(edges))


def _sersic_b(n: float) -> float:
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n)


def _galaxy_stamp(src: Source, y_lo: int, y_hi: int, x_lo: int, x_hi: int,
                  sub: int = 3) -> np.ndarray:
    """Sersic surface brightness integrated on a ``sub``x``sub`` grid per pixel, unit sum."""
    off = (np.arange(sub) + 0.5) / sub - 0.5
    ys = (np.arange(y_lo, y_hi)[:, None] + off[None, :]).ravel() - src.y
    xs = (np.arange(x_lo, x_hi)[:, None] + off[None, :]).ravel() - src.x
    c, s = math.cos(src.theta), math.sin(src.theta)
    xx = xs[None, :] * c + ys[:, None] * s
    yy = -xs[None, :] * s + ys[:, None] * c
    r = np.sqrt(xx ** 2 + (yy / src.q) ** 2)
    img = np.exp(-_sersic_b(src.n) * ((r / src.r_eff) ** (1.0 / src.n) - 1.0))
    img = img.reshape(y_hi - y_lo, sub, x_hi - x_lo, sub).sum(axis=(1, 3))
    total = img.sum()
    return img / total if total > 0 else img


def render_rate(scene: Scene, y0: int, x0: int, ny: int, nx: int) -> np.ndarray:
    """Scene rate [e-/s] on the DMS window (y0, x0, ny, nx), float32 (ny, nx).

    Stars are pixel-integrated Gaussians (stamp radius 8 sigma); galaxies Sersic profiles
    normalised to ``flux`` within a stamp of radius 5 r_eff (n < 2) or 7 r_eff.
    Sources outside the window contribute their overlapping part.
    """
    out = np.full((ny, nx), scene.sky, dtype=np.float64)
    for src in scene.sources:
        if src.kind == "star":
            rad = 8.0 * src.sigma
        else:
            rad = (5.0 if src.n < 2 else 7.0) * max(src.r_eff, 0.5)
        ylo = max(int(math.floor(src.y - rad)), 0)
        yhi = min(int(math.ceil(src.y + rad)) + 1, FULL_SIZE)
        xlo = max(int(math.floor(src.x - rad)), 0)
        xhi = min(int(math.ceil(src.x + rad)) + 1, FULL_SIZE)
        # clip the stamp to the window
        wy0, wy1 = max(ylo, y0), min(yhi, y0 + ny)
        wx0, wx1 = max(xlo, x0), min(xhi, x0 + nx)
        if wy0 >= wy1 or wx0 >= wx1:
            continue
        if src.kind == "star":
            stamp = np.outer(_gauss_1d(src.y, src.sigma, wy0, wy1),
                             _gauss_1d(src.x, src.sigma, wx0, wx1))
        else:
            full = _galaxy_stamp(src, ylo, yhi, xlo, xhi, sub=3 if src.r_eff < 3 else 2)
            stamp = full[wy0 - ylo:wy1 - ylo, wx0 - xlo:wx1 - xlo]
        out[wy0 - y0:wy1 - y0, wx0 - x0:wx1 - x0] += src.flux * stamp
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------
# Pointing and a simple WCS
# --------------------------------------------------------------------------------------

def _rot(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    if axis == 1:
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == 2:
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _unit(lon: float, lat: float) -> np.ndarray:
    return np.array([math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)])


def attitude_matrix(ra_v1: float, dec_v1: float, pa_v3: float) -> np.ndarray:
    """3x3 rotation taking V-frame unit vectors to ICRS (angles in degrees).

    The V1 axis points at (ra_v1, dec_v1); +V3 points ``pa_v3`` east of north there.
    """
    r = math.radians
    return _rot(3, r(ra_v1)) @ _rot(2, -r(dec_v1)) @ _rot(1, -r(pa_v3))


def v2v3_to_sky(att: np.ndarray, v2: float, v3: float) -> tuple[float, float]:
    """(v2, v3) [arcsec] -> (ra, dec) [deg] through an attitude matrix."""
    vec = att @ _unit(math.radians(v2 / 3600.0), math.radians(v3 / 3600.0))
    ra = math.degrees(math.atan2(vec[1], vec[0])) % 360.0
    return ra, math.degrees(math.asin(max(-1.0, min(1.0, vec[2]))))


def position_angle(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Position angle [deg, east of north] of point 2 seen from point 1 (degrees in)."""
    a1, d1, a2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    y = math.sin(a2 - a1) * math.cos(d2)
    x = math.cos(d1) * math.sin(d2) - math.sin(d1) * math.cos(d2) * math.cos(a2 - a1)
    return math.degrees(math.atan2(y, x)) % 360.0


@dataclass(frozen=True)
class Pointing:
    """Telescope attitude and the aperture reference point it puts on the sky."""

    ra_v1: float
    dec_v1: float
    pa_v3: float
    ra_ref: float
    dec_ref: float
    roll_ref: float
    v2_ref: float
    v3_ref: float


def point_aperture(ra_ref: float, dec_ref: float, pa_v3: float, v2_ref: float,
                   v3_ref: float) -> Pointing:
    """Attitude placing (v2_ref, v3_ref) at (ra_ref, dec_ref) with V3 position angle pa_v3.

    Fixed-point iteration on the V1 position (converges to < 1e-9 deg in a few steps).
    ROLL_REF is the local position angle of +V3 at the reference point.
    """
    ra_v1, dec_v1 = ra_ref, dec_ref
    for _ in range(20):
        att = attitude_matrix(ra_v1, dec_v1, pa_v3)
        ra, dec = v2v3_to_sky(att, v2_ref, v3_ref)
        dra = ((ra_ref - ra + 180.0) % 360.0) - 180.0
        ddec = dec_ref - dec
        ra_v1 += dra
        dec_v1 += ddec
        if abs(dra) < 1e-11 and abs(ddec) < 1e-11:
            break
    att = attitude_matrix(ra_v1, dec_v1, pa_v3)
    # exact local +V3 direction: derivative of the V-frame unit vector w.r.t. v3
    v2, v3 = math.radians(v2_ref / 3600.0), math.radians(v3_ref / 3600.0)
    tangent = att @ np.array([-math.sin(v3) * math.cos(v2), -math.sin(v3) * math.sin(v2),
                              math.cos(v3)])
    a, d = math.radians(ra_ref), math.radians(dec_ref)
    east = np.array([-math.sin(a), math.cos(a), 0.0])
    north = np.array([-math.sin(d) * math.cos(a), -math.sin(d) * math.sin(a), math.cos(d)])
    roll = math.degrees(math.atan2(tangent @ east, tangent @ north)) % 360.0
    return Pointing(ra_v1 % 360.0, dec_v1, pa_v3 % 360.0, ra_ref, dec_ref, roll, v2_ref, v3_ref)


@dataclass(frozen=True)
class TangentPlaneWCS:
    """Gnomonic WCS of a window: CRPIX (1-based window pixels), CRVAL (deg), PC, scale."""

    crpix1: float
    crpix2: float
    crval1: float
    crval2: float
    cdelt: float           # deg / pixel
    pc: tuple[float, float, float, float]

    def pixel_to_world(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based window pixel -> (ra, dec) deg."""
        dx = np.asarray(x, float) + 1.0 - self.crpix1
        dy = np.asarray(y, float) + 1.0 - self.crpix2
        p11, p12, p21, p22 = self.pc
        xi = np.radians(self.cdelt * (p11 * dx + p12 * dy))
        eta = np.radians(self.cdelt * (p21 * dx + p22 * dy))
        a0, d0 = math.radians(self.crval1), math.radians(self.crval2)
        den = math.cos(d0) - eta * math.sin(d0)
        ra = a0 + np.arctan2(xi, den)
        dec = np.arctan2(math.sin(d0) + eta * math.cos(d0), np.hypot(xi, den))
        return np.degrees(ra) % 360.0, np.degrees(dec)

    def world_to_pixel(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) deg -> 0-based window pixel."""
        a = np.radians(np.asarray(ra, float))
        d = np.radians(np.asarray(dec, float))
        a0, d0 = math.radians(self.crval1), math.radians(self.crval2)
        cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
        xi = np.degrees(np.cos(d) * np.sin(a - a0) / cosc)
        eta = np.degrees((math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d)
                          * np.cos(a - a0)) / cosc)
        p11, p12, p21, p22 = self.pc
        det = p11 * p22 - p12 * p21
        u, v = xi / self.cdelt, eta / self.cdelt
        dx = (p22 * u - p12 * v) / det
        dy = (-p21 * u + p11 * v) / det
        return dx + self.crpix1 - 1.0, dy + self.crpix2 - 1.0

    def header_cards(self) -> dict[str, object]:
        """FITS WCS keywords (SCI extension)."""
        return {"WCSAXES": 2, "CRPIX1": self.crpix1, "CRPIX2": self.crpix2,
                "CRVAL1": self.crval1, "CRVAL2": self.crval2, "CTYPE1": "RA---TAN",
                "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
                "CDELT1": self.cdelt, "CDELT2": self.cdelt, "PC1_1": self.pc[0],
                "PC1_2": self.pc[1], "PC2_1": self.pc[2], "PC2_2": self.pc[3]}


def aperture_wcs(info: DetectorInfo, sub: Subarray, pointing: Pointing) -> TangentPlaneWCS:
    """Distortion-free WCS of ``sub`` with its centre at (RA_REF, DEC_REF).

    PC follows jwst's convention: angle = ROLL_REF - VPARITY * V3I_YANG,
    PC = [[p cos a, sin a], [-p sin a, cos a]] with p = VPARITY.
    """
    a = math.radians(pa_aper(info, pointing))
    p = info.vparity
    pc = (p * math.cos(a), math.sin(a), -p * math.sin(a), math.cos(a))
    return TangentPlaneWCS(crpix1=(sub.xsize + 1) / 2.0, crpix2=(sub.ysize + 1) / 2.0,
                           crval1=pointing.ra_ref, crval2=pointing.dec_ref,
                           cdelt=info.pixel_scale / 3600.0, pc=pc)


def pa_aper(info: DetectorInfo, pointing: Pointing) -> float:
    """Position angle [deg] of the aperture's ideal +y axis: ROLL_REF - VPARITY*V3I_YANG."""
    return (pointing.roll_ref - info.vparity * info.v3_yangle) % 360.0


def subarray_v2v3(info: DetectorInfo, sub: Subarray) -> tuple[float, float]:
    """(V2, V3) [arcsec] of the subarray centre, linear (distortion-free) SIAF transform.

    Ideal offsets are science-pixel offsets x pixel scale; ideal -> V uses VIdlParity and
    V3IdlYAngle (agrees with the SIAF subarray V2Ref/V3Ref to ~0.3 arcsec).
    """
    dx = (sub.x0 + sub.xsize / 2.0 - FULL_SIZE / 2.0) * info.pixel_scale
    dy = (sub.y0 + sub.ysize / 2.0 - FULL_SIZE / 2.0) * info.pixel_scale
    ang = math.radians(info.v3_yangle)
    v2 = info.v2_ref + info.vparity * dx * math.cos(ang) + dy * math.sin(ang)
    v3 = info.v3_ref - info.vparity * dx * math.sin(ang) + dy * math.cos(ang)
    return v2, v3


def project(sources: Sequence[SkySource], world_to_pixel: Callable, x0: int, y0: int,
            pixel_scale: float) -> list[Source]:
    """Sky sources -> detector-pixel :class:`Source` list through ``world_to_pixel``.

    ``world_to_pixel(ra, dec)`` returns 0-based pixel coordinates of the window whose
    first pixel is full-frame (y0, x0); sizes are converted with ``pixel_scale`` [arcsec/px].
    """
    out = []
    for s in sources:
        x, y = world_to_pixel(np.array([s.ra]), np.array([s.dec]))
        sigma = s.fwhm / pixel_scale / 2.3548
        out.append(Source(s.kind, float(x[0]) + x0, float(y[0]) + y0, s.flux, sigma=sigma,
                          r_eff=s.r_eff / pixel_scale, n=s.n, q=s.q,
                          theta=math.radians(s.pa), id=s.id))
    return out


def shifted(scene: Scene, dx: float, dy: float) -> Scene:
    """The scene moved by (dx, dy) pixels (e.g. a simple dither)."""
    return Scene(sky=scene.sky, sources=[replace(s, x=s.x + dx, y=s.y + dy)
                                         for s in scene.sources])


__all__ = [
    "Pointing", "Scene", "SkySource", "Source", "TangentPlaneWCS", "aperture_wcs", "pa_aper",
    "attitude_matrix", "point_aperture", "position_angle", "project", "random_scene",
    "render_rate", "shifted", "subarray_v2v3", "v2v3_to_sky",
]
