"""The speed figure of ``run.py``: clips/s against batch size per engine, limits as dashed lines.

Drawn with NumPy and OpenCV (already a runtime dependency), on a log-scaled clips/s axis so the
reference and int8 fit one picture. Each dashed line is the clips/s a graph would reach if all of
its counted products ran at this machine's measured GEMM rate.
"""
import math
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 900, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 230, 40, 60
# BGR, one per engine in drawing order
# BGR, one per engine row (ten rows with every CPU backend measured)
COLOURS = [(60, 60, 60), (180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
           (75, 86, 140), (194, 119, 227), (34, 189, 188), (207, 190, 23), (127, 127, 127), (0, 0, 128)]
FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX


def draw_speed_figure(payload: dict, path: Path) -> Path:
    import cv2
    from keyreid.files import write_bytes

    engines = payload["engines"]
    batches = sorted({int(batch) for result in engines.values() for batch in result["batches"]})
    values = [entry["clips_per_s"] for result in engines.values() for entry in result["batches"].values()]
    values += [result["limit_clips_per_s"] for result in engines.values() if result["limit_clips_per_s"]]
    low, high = math.log10(min(values) / 1.5), math.log10(max(values) * 1.5)
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x_of(batch):
        span = math.log2(batches[-1] / batches[0]) or 1.0
        return int(LEFT + plot_w * (math.log2(batch / batches[0]) / span if len(batches) > 1 else 0.5))

    def y_of(value):
        return int(TOP + plot_h * (1 - (math.log10(value) - low) / (high - low)))

    cv2.rectangle(image, (LEFT, TOP), (LEFT + plot_w, TOP + plot_h), (0, 0, 0), 1)
    for exponent in range(math.floor(low), math.ceil(high) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0 ** exponent
            if low <= math.log10(value) <= high:
                y = y_of(value)
                cv2.line(image, (LEFT, y), (LEFT + plot_w, y), (225, 225, 225), 1)
                cv2.putText(image, f"{value:g}", (8, y + 4), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for batch in batches:
        cv2.putText(image, str(batch), (x_of(batch) - 6, TOP + plot_h + 18), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, "batch (clips per call)", (LEFT + plot_w // 2 - 80, HEIGHT - 15), FONT, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(image, "clips/s", (8, TOP - 14), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    machine = payload["machine"]
    cv2.putText(image, f"{machine['cpu']}, {machine['threads']} threads, width {payload['embed_dim']}",
                (LEFT, TOP - 14), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)

    drawn_limits = set()
    for index, (name, result) in enumerate(engines.items()):
        colour = COLOURS[index % len(COLOURS)]
        points = [(x_of(int(batch)), y_of(entry["clips_per_s"])) for batch, entry in sorted(
            result["batches"].items(), key=lambda item: int(item[0]))]
        for start, end in zip(points, points[1:]):
            cv2.line(image, start, end, colour, 2, cv2.LINE_AA)
        for point in points:
            cv2.circle(image, point, 4, colour, -1, cv2.LINE_AA)
        legend_y = TOP + 16 + 20 * index
        cv2.line(image, (LEFT + plot_w + 12, legend_y - 4), (LEFT + plot_w + 32, legend_y - 4), colour, 2)
        cv2.putText(image, name, (LEFT + plot_w + 38, legend_y), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        limit = result["limit_clips_per_s"]
        graph = result.get("graph", name)
        if limit is None or (graph, limit) in drawn_limits:
            continue
        drawn_limits.add((graph, limit))
        y = y_of(limit)
        for x in range(LEFT, LEFT + plot_w, 12):      # dashed
            cv2.line(image, (x, y), (min(x + 6, LEFT + plot_w), y), colour, 1)
    note_y = TOP + 16 + 20 * len(engines) + 10
    cv2.putText(image, "dashed: limit at the", (LEFT + plot_w + 12, note_y), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, "measured GEMM rates", (LEFT + plot_w + 12, note_y + 16), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode the figure")
    return write_bytes(path, encoded.tobytes())
