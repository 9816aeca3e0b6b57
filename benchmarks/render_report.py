"""Look at a report as a reader would: render ``report.html`` to PNG pages at 100 % zoom.

No browser installs from the package registries this project uses, so the page is laid out by WeasyPrint (an
HTML/CSS engine, not Chromium) into a PDF of A3-landscape pages ≈ 1,400 CSS px wide and rasterised by pypdfium2 at
96 dpi (1 CSS px = 1 pixel). Both are developer tools, not dependencies of the package:

    pip install weasyprint pypdfium2
    python benchmarks/render_report.py perturbdiff_demo/report.html --out report_pages/
"""

from __future__ import annotations

import argparse
from pathlib import Path

PAGE_CSS = "@page { size: 1500px 2100px; margin: 40px }"


def render(html: Path, out: Path) -> list[Path]:
    """``out/page-<k>.png`` for every page of ``html``; their paths."""
    import pypdfium2
    import weasyprint

    out.mkdir(parents=True, exist_ok=True)
    pdf = out / "report.pdf"
    weasyprint.HTML(filename=str(html)).write_pdf(pdf, stylesheets=[weasyprint.CSS(string=PAGE_CSS)])
    paths = []
    doc = pypdfium2.PdfDocument(str(pdf))
    for k in range(len(doc)):
        image = doc[k].render(scale=96 / 72).to_pil()  # PDF points (1/72 in) to CSS pixels (1/96 in)
        path = out / f"page-{k + 1}.png"
        image.save(path)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for path in render(args.html, args.out):
        print(path)


if __name__ == "__main__":
    main()
