"""Small bench files built in code, shared by tests/test_benches.py and tests/test_bench_parity.py."""

import base64
import io

from PIL import Image

MMB_HEADER = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"


def png_b64(seed: int) -> str:
    """A small PNG (size and colour from ``seed``), base64-encoded as MMBench's TSV holds images."""
    buffer = io.BytesIO()
    Image.new("RGB", (20 + seed, 24), (10 * seed, 80, 160)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mmb_row(index: int, options: list[str], answer: str, image: int = 1) -> str:
    """One MMBench TSV row (hint "Look closely.", question "Which colour?"); missing options are "nan"."""
    cells = [*options, *["nan"] * (4 - len(options))]
    return f"{index}\tWhich colour?\tLook closely.\t" + "\t".join(cells) + f"\t{answer}\tcolour\t{png_b64(image)}\n"
