"""Pre- and post-processing of an image edit (img2img, inpainting), shared by every backend.

`prepare_edit` turns the picture and mask as uploaded (any size) and the resolved `EditSpec` into what the model
works on (image and mask at the spec's size: resized, or cut around the mask for `padding_mask_crop`) plus what
the output is composed from; `compose_edit` composes the model's outputs into what the client receives. The
service's backends (`serve_app.edit_composition`), streamed previews included, and `LocalPipeline.edit` all go through
these two, so an edit gives the same pixels wherever it runs.

Composition is diffusers' `VaeImageProcessor.apply_overlay` (A1111's "overlay"): the input is laid back over the
model's output through the overlay mask's complement, so pixels outside the mask are the input's, not the VAE's
softened reconstruction of it. The overlay mask has a soft edge so the seam does not show (`overlay_mask`).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from lightray.contracts import PNG, OutputEncoding
from lightray.images import encode_image, resize_for_model
from lightray.schemas import EditSpec

OVERLAY_EDGE_PX = 2
"""Radius of the overlay's soft edge when the request gives no `mask_blur`: the overlay mask is the mask
box-blurred with this radius. A pixel with no mask pixel within 2 px horizontally and vertically (its 5×5
neighbourhood) is the input exactly; one whose 5×5 neighbourhood is all mask is the model's exactly; across a
straight edge the model's share ramps 1/5, 2/5 (the two pixels outside), 3/5, 4/5 (the two inside), then 1. A box
blur, unlike a Gaussian, has a support of exactly this radius, so where the input is kept is exact."""


@dataclasses.dataclass(frozen=True)
class PreparedEdit:
    """An edit's model-size inputs and what its outputs are composed from."""

    image: Image.Image
    """RGB, the spec's width×height: what the model edits."""
    mask: Image.Image | None
    """"L", the same size, non-zero where the model repaints (diffusers' convention); None for img2img."""
    canvas: Image.Image
    """RGB, the output's size: the picture the outputs are composed onto. The full input with
    `padding_mask_crop`, else `image`."""
    overlay: Image.Image | None
    """"L", the canvas's size: 255 where the output is the model's, 0 where it is the canvas's, in between on the
    soft edge. None: the model's outputs are returned as they are (img2img, or inpainting with `keep_unmasked`
    off and no crop)."""
    box: tuple[int, int, int, int] | None
    """With `padding_mask_crop`: the crop box (left, top, right, bottom) in the canvas, into which the model's
    output is resized back."""

    @property
    def composes(self) -> bool:
        """Whether `compose_edit` changes the model's outputs at all."""
        return self.overlay is not None


def prepare_edit(image: Image.Image, mask: Image.Image | None, spec: EditSpec) -> PreparedEdit:
    """The model's inputs for `spec` from the picture and the optional mask ("L", non-zero = repaint) as uploaded:
    the mask blurred by `spec.mask_blur`, then both cut around the mask (`padding_mask_crop`) or resized to the
    spec's size as diffusers' pipelines resize them; and the overlay that `compose_edit` applies."""
    image = image.convert("RGB")
    if mask is not None:
        mask = mask.convert("L")
        if spec.mask_blur:
            mask = blur_mask(mask, spec.mask_blur)
    box = None
    if spec.padding_mask_crop is not None:
        if mask is None:
            raise ValueError("padding_mask_crop needs a mask")
        model_image, model_mask, box = crop_for_inpainting(image, mask, spec.width, spec.height,
                                                           spec.padding_mask_crop)
        canvas, canvas_mask = image, mask
    else:
        model_image = resize_for_model(image, spec.width, spec.height)
        model_mask = None if mask is None else resize_for_model(mask, spec.width, spec.height)
        canvas, canvas_mask = model_image, model_mask
    overlay = None
    if canvas_mask is not None:
        if spec.keep_unmasked:
            overlay = overlay_mask(canvas_mask, spec.mask_blur)
        elif box is not None:  # nothing kept by the mask, but the crop still has to go back into its box
            overlay = Image.new("L", canvas.size, 0)
            overlay.paste(255, box)
    return PreparedEdit(model_image, model_mask, canvas, overlay, box)


def overlay_mask(mask: Image.Image, mask_blur: int | None) -> Image.Image:
    """The overlay's alpha for `mask` (at the canvas's size, already blurred by `mask_blur` if that is set): the
    blurred mask itself when the request chose a blur (0: a hard edge), as diffusers and A1111 use it; otherwise
    the mask with a soft edge of `OVERLAY_EDGE_PX`."""
    if mask_blur is not None:
        return mask
    return mask.filter(ImageFilter.BoxBlur(OVERLAY_EDGE_PX))


def output_size(spec: EditSpec, image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the images an edit of a picture of `image_size` returns: the picture's own size with
    `padding_mask_crop` (the crop is pasted back into it), else the spec's."""
    return image_size if spec.padding_mask_crop is not None else (spec.width, spec.height)


def compose_edit(outputs: Sequence[Image.Image], prepared: PreparedEdit) -> list[Image.Image]:
    """What the client receives for the model's `outputs` (spec-size images, one per seed): each placed into its
    crop box if there is one, with the canvas laid over it outside the overlay."""
    if prepared.overlay is None:
        return list(outputs)
    return [_apply_overlay(prepared.overlay, prepared.canvas, _placed(out.convert("RGB"), prepared))
            for out in outputs]


def decoded_encoding(prepared: PreparedEdit, wanted: OutputEncoding) -> OutputEncoding:
    """How the VAE stage should encode an edit's model outputs so that `compose_pngs` can finish them as `wanted`:
    PNG when they will be composed (lossless, so the composition starts from the decoded pixels exactly), else
    `wanted` itself (the outputs are the answer)."""
    return PNG if prepared.composes else wanted


def compose_pngs(pngs: Sequence[bytes], prepared: PreparedEdit, encoding: OutputEncoding = PNG) -> list[bytes]:
    """`compose_edit` for encoded images as the VAE stage returns them (encoded as `decoded_encoding` says), the
    results encoded as `encoding`; the bytes unchanged when nothing is composed. The inputs are then PNGs, which
    are lossless, so this gives the bytes `compose_edit` then `encode_image` would."""
    if not prepared.composes:
        return list(pngs)
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    return [encode_image(im, encoding) for im in compose_edit(images, prepared)]


def preview_frame(prepared: PreparedEdit) -> PreparedEdit:
    """What a streamed edit's previews are composed onto. Without a crop the canvas is the model's image, so
    `prepared` itself. With `padding_mask_crop` the canvas is the whole input (up to `max_image_pixels`): composing
    and encoding it per preview would cost each preview what the final image costs, so the canvas, the overlay and
    the crop box are scaled down (once per stream) to at most the model's pixels, and a preview costs what one of
    the model's size does. The final image is composed at full size from `prepared`."""
    if prepared.box is None:
        return prepared
    (cw, ch), (mw, mh) = prepared.canvas.size, prepared.image.size
    scale = min(1.0, math.sqrt(mw * mh / (cw * ch)))
    if scale == 1.0:
        return prepared
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    x, y, x2, y2 = prepared.box
    left, top = math.floor(x * scale), math.floor(y * scale)
    box = (left, top, max(left + 1, math.ceil(x2 * scale)), max(top + 1, math.ceil(y2 * scale)))
    return dataclasses.replace(prepared, canvas=prepared.canvas.resize(size, Image.Resampling.BILINEAR),
                               overlay=prepared.overlay.resize(size, Image.Resampling.BILINEAR), box=box)


def compose_preview_pngs(pngs: Sequence[bytes], prepared: PreparedEdit, encoding: OutputEncoding = PNG) -> list[bytes]:
    """`compose_pngs` for a streamed edit's previews, which may be smaller than the model's output (a fast preview
    is a quarter of its side, `lightray.stages.preview`): each is first resized to the model's size (bilinear), so
    it lands on the canvas where the final image will, then composed. `prepared` is `preview_frame`'s: the composed
    preview has the output's size, or with `padding_mask_crop` at most the model's pixels (the output scaled
    down), and the input's pixels (scaled as the preview is) where the final image will. Unchanged bytes when
    nothing is composed (an img2img preview keeps its own size, as a generation's does)."""
    if not prepared.composes:
        return list(pngs)
    size = prepared.image.size
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    images = [im if im.size == size else im.resize(size, Image.Resampling.BILINEAR) for im in images]
    return [encode_image(im, encoding) for im in compose_edit(images, prepared)]


def _placed(output: Image.Image, prepared: PreparedEdit) -> Image.Image:
    """The model's output on the canvas's frame: resized into the crop box on black (as `apply_overlay` places
    it), or as it is without a crop."""
    if prepared.box is None:
        return output
    x, y, x2, y2 = prepared.box
    base = Image.new("RGBA", prepared.canvas.size)
    base.paste(resize_crop(output, x2 - x, y2 - y), (x, y))
    return base.convert("RGB")


def _apply_overlay(overlay: Image.Image, canvas: Image.Image, output: Image.Image) -> Image.Image:
    """diffusers' `VaeImageProcessor.apply_overlay(overlay, canvas, output)` (no crop), the same PIL calls, so the
    same rounding: here rather than imported because this runs at the ingress for every inpainting request, and
    diffusers imports torch."""
    kept = Image.new("RGBa", canvas.size)
    kept.paste(canvas.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay))
    composed = output.convert("RGBA")
    composed.alpha_composite(kept.convert("RGBA"))
    return composed.convert("RGB")


def crop_for_inpainting(image: Image.Image, mask: Image.Image, width: int, height: int,
                        pad: int) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """diffusers' `padding_mask_crop` preprocessing: the mask's bounding box grown by `pad` and to width:height,
    cut from image and mask and resized to width×height ("fill" mode). Returns (image, mask, crop box)."""
    box = crop_region(mask, width, height, pad)
    picture = resize_fill(image.crop(box), width, height)
    # The pipeline's mask processor fills onto an RGB canvas, then converts to grayscale.
    edit = resize_fill(mask.crop(box), width, height).convert("L")
    return picture, edit, box


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """diffusers' `VaeImageProcessor.blur`: a Gaussian blur of the given radius (the same PIL filter, without
    importing diffusers)."""
    return mask.filter(ImageFilter.GaussianBlur(radius))


# diffusers' VaeImageProcessor's crop helpers, written out with the same arithmetic and PIL calls: the ingress
# prepares and composes edits, and importing diffusers there would load torch (tests/test_layering.py).
# tests/test_image_inputs.py checks them against diffusers' own on many masks and sizes.

def crop_region(mask: Image.Image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """`VaeImageProcessor.get_crop_region`: the bounding box of the mask's non-zero pixels, grown by `pad` and then
    to the aspect ratio width:height, kept inside the image. (x1, y1, x2, y2)."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    crop_left, crop_right = (int(cols[0]), int(w - 1 - cols[-1])) if cols.size else (w, w)
    crop_top, crop_bottom = (int(rows[0]), int(h - 1 - rows[-1])) if rows.size else (h, h)
    x1, y1 = int(max(crop_left - pad, 0)), int(max(crop_top - pad, 0))
    x2, y2 = int(min(w - crop_right + pad, w)), int(min(h - crop_bottom + pad, h))
    ratio_crop, ratio_processing = (x2 - x1) / (y2 - y1), width / height
    if ratio_crop > ratio_processing:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / ratio_processing - (y2 - y1)), mask.height)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * ratio_processing - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, by: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown by `by` (half each side), shifted back inside [0, limit), as `get_crop_region` does."""
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """`VaeImageProcessor.resize(..., resize_mode="fill")`: fit inside width×height keeping the aspect ratio
    (lanczos), centre it, and fill the bands with the image's stretched edge rows or columns."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return res


def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """`VaeImageProcessor.resize(..., resize_mode="crop")`: cover width×height keeping the aspect ratio (lanczos),
    centred, the excess cut off."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res
