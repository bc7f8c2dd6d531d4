"""The run report's building blocks: escaped HTML, tables, embedded images and inline SVG charts.

Everything here writes text that opens offline: images become ``data:`` URIs, charts are inline SVG
(no script, no font or style sheet from elsewhere). Every string that came from the data is escaped
by :func:`esc`; only :class:`Html` (markup this package built itself) passes through unescaped.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from core.explain import render
from core.results import score_axis, score_text, tick_text

THUMB_PX = 192
"""The longer side of an image in the report: small images are enlarged (each pixel a square block),
large ones reduced, so 300 Fashion-MNIST thumbnails and 900-px MVTec photos weigh about the same."""
JPEG_QUALITY = 85
ABOVE, BELOW, LINE = "#d62728", "#1f77b4", "#222"
"""Chart colours: samples above the threshold, at or below it, the threshold line and axes."""


class Html(str):
    """Markup built by this package: :func:`esc` leaves it as it is."""


def esc(value) -> Html:
    """``value`` as text safe inside HTML (markup of :class:`Html` is kept)."""
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def join(parts: Iterable) -> Html:
    """The parts one after another, each escaped unless it is :class:`Html`."""
    return Html("".join(esc(part) for part in parts))


def tag(name: str, content="", **attributes) -> Html:
    """``<name attributes>content</name>``; attribute values escaped, ``class_`` written ``class``."""
    attrs = "".join(f' {key.rstrip("_").replace("_", "-")}="{esc(value)}"' for key, value in attributes.items())
    return Html(f"<{name}{attrs}>{esc(content) if not isinstance(content, list) else join(content)}</{name}>")


def table(header: Sequence, rows: Iterable[Sequence], caption: str = "", **attributes) -> Html:
    """An HTML table; every header and cell escaped unless it is :class:`Html`."""
    head = tag("tr", [tag("th", cell) for cell in header])
    body = [tag("tr", [tag("td", cell) for cell in row]) for row in rows]
    return tag("table", ([tag("caption", caption)] if caption else []) + [tag("thead", [head]), tag("tbody", body)],
               **attributes)


def number(value, digits: int = 4) -> str:
    """A number as short text (``-`` for None or NaN)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, (float, np.floating)) else str(value)


# ------------------------------------------------------------------------------------------- images


def image_uri(rgb: np.ndarray) -> str:
    """``(H, W, 3) uint8`` as a ``data:`` URI: PNG or JPEG, whichever is smaller."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    encoded = {}
    for fmt, mime, options in (("PNG", "image/png", {"optimize": True}),
                               ("JPEG", "image/jpeg", {"quality": JPEG_QUALITY})):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        encoded[mime] = buffer.getvalue()
    mime = min(encoded, key=lambda key: len(encoded[key]))
    return f"data:{mime};base64,{base64.b64encode(encoded[mime]).decode('ascii')}"


def img(rgb: np.ndarray, alt: str) -> Html:
    """An ``<img>`` of ``rgb`` embedded in the page, with its size written out."""
    return Html(f'<img src="{image_uri(rgb)}" alt="{esc(alt)}" width="{rgb.shape[1]}" height="{rgb.shape[0]}">')


def thumbnail_pair(image: np.ndarray, amap: np.ndarray | None, scale: render.ColourScale | None,
                   px: int = THUMB_PX) -> tuple[np.ndarray, np.ndarray | None]:
    """The image at about ``px`` on its longer side and, with a map, its heatmap on the run's ``scale``.

    Parameters
    ----------
    image : (H, W, 3) uint8
    amap : (H, W) float or None
        The anomaly map at the image's own size.

    Returns
    -------
    image : (h, w, 3) uint8
    heatmap : (h, w, 3) uint8 or None
        The map above the normal floor blended over the image (:func:`core.explain.render.heatmap`).
    """
    height, width = image.shape[:2]
    if max(height, width) <= px:  # small: each pixel a block, nothing invented between them
        blocks = max(1, px // max(height, width))
        image = np.repeat(np.repeat(image, blocks, axis=0), blocks, axis=1)
        amap = None if amap is None else np.repeat(np.repeat(amap, blocks, axis=0), blocks, axis=1)
    else:
        factor = px / max(height, width)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
        if amap is not None:
            amap = np.asarray(Image.fromarray(np.asarray(amap, dtype=np.float32))  # mode F: float32, one channel
                              .resize(size, Image.Resampling.BILINEAR))
    shown = None if amap is None or scale is None else render.heatmap(image, amap, scale)
    return image, shown


# ------------------------------------------------------------------------------------------- charts

_W, _H, _PAD = 640, 240, 44


def histogram_svg(anomaly_score: np.ndarray, threshold: float, bins: int = 40) -> Html:
    """The scores' histogram as inline SVG: bins above ``threshold`` red, the rest blue, the threshold a line.

    The x axis spans every score and the threshold, linear or logarithmic as :func:`score_axis` decides."""
    score = np.asarray(anomaly_score, dtype=np.float64)
    score = score[np.isfinite(score)]
    axis = score_axis(np.append(score, threshold))
    name, forward, inverse = axis.scale, axis.forward, axis.inverse  # the line must fit the axis too
    position, line = forward(score), float(forward(np.array([threshold]))[0])
    low, high = min(position.min(initial=line), line), max(position.max(initial=line), line)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    above = score > threshold
    below_counts, edges = np.histogram(position[~above], bins=bins, range=(low, high))
    above_counts, _ = np.histogram(position[above], bins=bins, range=(low, high))
    counts = below_counts + above_counts
    bounds = inverse(edges)
    x = lambda value: _PAD + (value - low) / (high - low) * (_W - 2 * _PAD)  # noqa: E731
    y = lambda count: _H - _PAD - count / max(1, counts.max()) * (_H - 2 * _PAD)  # noqa: E731
    parts = [f'<svg class="chart" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
             f'aria-label="histogram of anomaly_score with the threshold">']
    for i, (below, over) in enumerate(zip(below_counts, above_counts)):
        width = max(0.5, x(edges[i + 1]) - x(edges[i]) - 1)
        for base, count, colour, side in ((0, below, BELOW, "at or below"), (below, over, ABOVE, "above")):
            if count:  # red stacked on blue where a bar holds both
                parts.append(f'<rect x="{x(edges[i]):.1f}" y="{y(base + count):.1f}" width="{width:.1f}" '
                             f'height="{y(base) - y(base + count):.1f}" fill="{colour}"><title>{score_text(bounds[i])} to '
                             f'{score_text(bounds[i + 1])}: {count} {side} the threshold</title></rect>')
    label = "anomaly_score (higher = more anomalous)" + ("" if name == "linear" else f", {name} scale")
    parts += _axes(low, high, inverse, counts.max(), label, "samples", x, y)
    parts.append(f'<line x1="{x(line):.1f}" y1="{_PAD - 10}" x2="{x(line):.1f}" y2="{y(0):.1f}" '
                 f'stroke="{LINE}" stroke-width="2" stroke-dasharray="5 3"/>')
    anchor = "end" if x(line) > _W / 2 else "start"
    parts.append(f'<text x="{x(line) + (-4 if anchor == "end" else 4):.1f}" y="{_PAD - 12}" font-size="12" '
                 f'text-anchor="{anchor}">threshold {score_text(threshold)}</text>')
    return Html("".join(parts) + "</svg>")


def _axes(low: float, high: float, inverse, top: float, x_label: str, y_label: str, x, y) -> list[str]:
    """The x axis with five ticks (labelled with ``inverse`` of their position), the y axis with its top
    value, and both labels, as SVG elements."""
    parts = [f'<line x1="{_PAD}" y1="{y(0):.1f}" x2="{_W - _PAD}" y2="{y(0):.1f}" stroke="{LINE}"/>',
             f'<line x1="{_PAD}" y1="{y(0):.1f}" x2="{_PAD}" y2="{_PAD}" stroke="{LINE}"/>']
    for value in np.linspace(low, high, 5):
        parts.append(f'<text x="{x(value):.1f}" y="{y(0) + 16:.1f}" font-size="11" text-anchor="middle">'
                     f'{tick_text(float(inverse(value)))}</text>')
    parts.append(f'<text x="{_PAD - 4}" y="{_PAD + 4}" font-size="11" text-anchor="end">{int(top)}</text>')
    parts.append(f'<text x="{_PAD - 4}" y="{y(0):.1f}" font-size="11" text-anchor="end">0</text>')
    parts.append(f'<text x="{_W / 2:.0f}" y="{_H - 6}" font-size="12" text-anchor="middle">{esc(x_label)}</text>')
    parts.append(f'<text x="12" y="{_H / 2:.0f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 12 {_H / 2:.0f})">{esc(y_label)}</text>')
    return parts


def curve_svg(x_values: np.ndarray, y_values: np.ndarray, x_label: str, y_label: str, title: str,
              diagonal: bool = False, size: int = 260) -> Html:
    """A curve in the unit square (ROC or precision-recall) as inline SVG; ``diagonal`` draws chance."""
    pad, span = 40, size - 60
    points = " ".join(f"{pad + a * span:.1f},{pad + (1 - b) * span - 20:.1f}"
                      for a, b in zip(np.asarray(x_values, float), np.asarray(y_values, float)))
    bottom = pad + span - 20
    parts = [f'<svg class="chart" viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" '
             f'aria-label="{esc(title)}">',
             f'<text x="{size / 2:.0f}" y="14" font-size="12" text-anchor="middle">{esc(title)}</text>',
             f'<rect x="{pad}" y="{pad - 20}" width="{span}" height="{span}" fill="none" stroke="{LINE}"/>']
    if diagonal:
        parts.append(f'<line x1="{pad}" y1="{bottom}" x2="{pad + span}" y2="{pad - 20}" stroke="#999" '
                     f'stroke-dasharray="4 3"/>')
    parts.append(f'<polyline points="{points}" fill="none" stroke="{BELOW}" stroke-width="2"/>')
    for value in (0, 0.5, 1):
        parts.append(f'<text x="{pad + value * span:.1f}" y="{bottom + 14}" font-size="10" text-anchor="middle">'
                     f'{value:g}</text>')
        parts.append(f'<text x="{pad - 4}" y="{bottom - value * span + 4:.1f}" font-size="10" text-anchor="end">'
                     f'{value:g}</text>')
    parts.append(f'<text x="{pad + span / 2:.0f}" y="{size - 8}" font-size="11" text-anchor="middle">{esc(x_label)}</text>')
    parts.append(f'<text x="10" y="{pad + span / 2 - 20:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 10 {pad + span / 2 - 20:.0f})">{esc(y_label)}</text>')
    return Html("".join(parts) + "</svg>")
