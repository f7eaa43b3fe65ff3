"""imageio: one decode for prepare, streaming and predict; PIL-exact where no resize is needed."""

import numpy as np
import pytest
import torch
from PIL import Image

from phalanx.data.imageio import decode_chw, decode_rgb, decode_to_uint8, fit, probe, to_channels
from phalanx.errors import DataError, DecodeError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

RNG = np.random.default_rng(0)


def rgb(h, w):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def images_in_every_mode(h=20, w=30) -> dict[str, Image.Image]:
    base = rgb(h, w)
    return {
        "RGB": base,
        "RGBA": Image.fromarray(RNG.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA"),
        "L": Image.fromarray(RNG.integers(0, 256, (h, w), dtype=np.uint8)),
        "LA": Image.fromarray(RNG.integers(0, 256, (h, w, 2), dtype=np.uint8), "LA"),
        "P": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=40),
        "1": Image.fromarray(RNG.integers(0, 2, (h, w), dtype=np.uint8) * 255).convert("1"),
    }


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF", "WEBP"])
def test_lossless_files_decode_exactly_like_pil(tmp_path, mode, fmt):
    img = images_in_every_mode()[mode]
    if fmt == "BMP" and mode in ("LA", "RGBA"):
        img = img.convert("RGB")
    if fmt == "GIF":
        img = img.convert("P") if mode not in ("P", "L", "1") else img
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as ref:
        want_rgb, want_l = np.asarray(ref.convert("RGB")), np.asarray(ref.convert("L"))
    got = decode_to_uint8(path, 0, 3)
    assert got.dtype == np.uint8 and got.shape == want_rgb.shape
    np.testing.assert_array_equal(got, want_rgb)
    if fmt != "WEBP" or mode not in ("RGBA", "LA"):  # PIL's RGBA->L of WebP goes through another path
        np.testing.assert_array_equal(decode_to_uint8(path, 0, 1)[..., 0], want_l)


def test_png_palette_with_transparency_and_square_native_size(tmp_path):
    img = rgb(24, 24).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(tmp_path / "p.png", transparency=3)
    want = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(decode_to_uint8(tmp_path / "p.png", 24, 3), want)  # size == native: no resize


def test_16_bit_png_keeps_the_high_byte(tmp_path):
    a = RNG.integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    got = decode_to_uint8(tmp_path / "x.png", 0, 1)[..., 0]
    np.testing.assert_array_equal(got, (a >> 8).astype(np.uint8))
    got3 = decode_to_uint8(tmp_path / "x.png", 0, 3)
    assert (got3 == got[..., None]).all()


def test_jpeg_gray_and_color_close_to_pil(tmp_path):
    for name, img in (("c.jpg", rgb(30, 40)), ("g.jpg", images_in_every_mode()["L"])):
        img.save(tmp_path / name, quality=90)
        ref = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        got = decode_to_uint8(tmp_path / name, 0, 3).astype(int)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 2  # two builds of libjpeg-turbo


def test_gray_jpeg_round_trips_through_rgb_unchanged(tmp_path):
    Image.fromarray(RNG.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "g.jpg")
    three = decode_to_uint8(tmp_path / "g.jpg", 0, 3)
    one = decode_to_uint8(tmp_path / "g.jpg", 0, 1)
    assert (three[..., 0] == three[..., 1]).all() and (three[..., 0] == three[..., 2]).all()
    np.testing.assert_array_equal(one[..., 0], three[..., 0])


def test_luma_formula_is_pils():
    a = RNG.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(a).convert("L"))
    got = to_channels(torch.from_numpy(a).permute(2, 0, 1), 1)[0].numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("h,w", [(40, 60), (60, 40), (33, 33), (10, 14)])
def test_resize_shorter_side_and_centre_crop_match_torchvision(tmp_path, h, w):
    import torchvision.transforms.v2.functional as TF
    img = rgb(h, w)
    img.save(tmp_path / "x.png")
    got = decode_chw(tmp_path / "x.png", 24, 3)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    want = TF.center_crop(TF.resize(t, [24], antialias=True), [24, 24])  # torchvision's uint8 kernel
    assert got.shape == (3, 24, 24) and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def photo(h, w):
    """Smooth, photo-like pixels (a full decode and a reduced-scale one are then close)."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w) + 60], -1)
    return Image.fromarray(a.astype(np.uint8))


@pytest.mark.parametrize("h,w,size,scale", [(240, 200, 32, 4), (120, 130, 40, 2), (200, 220, 24, 8)])
def test_large_jpeg_is_decoded_at_reduced_scale_close_to_a_full_decode(tmp_path, h, w, size, scale):
    photo(h, w).save(tmp_path / "x.jpg", quality=90)
    got = decode_chw(tmp_path / "x.jpg", size, 3)
    with Image.open(tmp_path / "x.jpg") as im:  # libjpeg's scaled decode, then the usual resize + crop
        im.draft("RGB", (size, size))
        assert im.size == (-(-w // scale), -(-h // scale))
        small = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    torch.testing.assert_close(got, fit(small, size, 3), atol=0, rtol=0)
    torch.testing.assert_close(got, fit(small.contiguous(), size, 3), atol=0, rtol=0)  # layout-independent
    full = fit(decode_rgb(tmp_path / "x.jpg"), size, 3)  # native-size decode
    assert (got.int() - full.int()).abs().float().mean() < 3


def test_jpeg_under_twice_the_size_is_decoded_at_full_size(tmp_path):
    photo(50, 70).save(tmp_path / "x.jpg", quality=90)
    torch.testing.assert_close(decode_chw(tmp_path / "x.jpg", 26, 3), fit(decode_rgb(tmp_path / "x.jpg"), 26, 3),
                               atol=0, rtol=0)


def test_reduced_scale_decode_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW: the 100 x 200 landscape pixels are shown 200 x 100 portrait
    photo(100, 200).save(tmp_path / "r.jpg", exif=exif, quality=95)
    assert decode_rgb(tmp_path / "r.jpg", 20).shape == (3, 50, 25)  # 1/4 scale, rotated
    full = fit(decode_rgb(tmp_path / "r.jpg"), 20, 3)
    assert (decode_chw(tmp_path / "r.jpg", 20, 3).int() - full.int()).abs().float().mean() < 3


@pytest.mark.parametrize("h,w", [(20, 25), (80, 90)])  # full and reduced-scale decodes
def test_bytes_path_and_tensor_inputs_agree(tmp_path, h, w):
    rgb(h, w).save(tmp_path / "x.jpg")
    data = (tmp_path / "x.jpg").read_bytes()
    a = decode_to_uint8(tmp_path / "x.jpg", 16, 3)
    np.testing.assert_array_equal(a, decode_to_uint8(data, 16, 3))
    np.testing.assert_array_equal(a, decode_to_uint8(torch.frombuffer(bytearray(data), dtype=torch.uint8), 16, 3))


def test_exif_orientation_is_applied(tmp_path):
    img = rgb(20, 40)  # landscape pixels, tagged "rotate 90 CW" (orientation 6): viewers show it portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    assert decode_to_uint8(tmp_path / "r.jpg", 0, 3).shape == (40, 20, 3)
    assert probe(tmp_path / "r.jpg")[:2] == (40, 20)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, I am text", "not a recognised image format"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot"),
])
def test_unreadable_files_raise_decode_error_naming_the_file(tmp_path, content, reason):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(DecodeError) as e:
        decode_to_uint8(p, 16, 3)
    assert str(p) in str(e.value) and reason in e.value.reason
    assert isinstance(e.value, DataError)


def test_truncated_jpeg_is_an_error(tmp_path):
    rgb(64, 64).save(tmp_path / "x.jpg", quality=95)
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError):
        decode_to_uint8(tmp_path / "t.jpg", 16, 3)


def test_probe_reports_size_and_grayness(tmp_path):
    modes = images_in_every_mode(12, 18)
    for m, img in modes.items():
        img.save(tmp_path / f"{m}.png")
        h, w, gray = probe(tmp_path / f"{m}.png")
        assert (h, w) == (12, 18)
        assert gray == (m in ("L", "LA", "1")), m
    gray_palette = modes["L"].convert("P")  # a palette of grays only
    gray_palette.save(tmp_path / "gp.png")
    assert probe(tmp_path / "gp.png")[2]
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DecodeError, match="0 bytes"):
        probe(tmp_path / "zero.png")


def test_decode_error_survives_pickling_and_one_argument_construction():
    import pickle
    e = pickle.loads(pickle.dumps(DecodeError("a.png", "broken")))
    assert str(e) == "a.png: broken"
    assert str(DecodeError("whole message")) == "whole message"


@pytest.mark.parametrize("kw", [{}, {"progressive": True}, {"exif": b"Exif\x00\x00" + b"\x00" * 300}, {"gray": True}])
def test_jpeg_size_reads_the_frame_header(tmp_path, kw):
    from phalanx.data.imageio import jpeg_header
    gray = kw.pop("gray", False)
    img = photo(37, 53).convert("L") if gray else photo(37, 53)
    img.save(tmp_path / "x.jpg", quality=90, **kw)
    data = (tmp_path / "x.jpg").read_bytes()
    assert jpeg_header(data)[:2] == (37, 53)
    assert jpeg_header(data[:20]) is None  # cut before the frame header
    assert jpeg_header(b"\xff\xd8\xff\xda\x00\x02") is None  # scan before any frame header


@pytest.mark.parametrize("h,w,size,kw", [(332, 423, 64, {}), (200, 150, 64, {}), (129, 300, 32, {"progressive": True}),
                                         (300, 300, 16, {"gray": True}), (77, 41, 9, {})])
def test_turbo_and_pil_reduced_decodes_give_the_same_pixels(tmp_path, h, w, size, kw):
    pytest.importorskip("simplejpeg")
    from phalanx.data import imageio as io
    gray = kw.pop("gray", False)
    img = photo(h, w).convert("L") if gray else photo(h, w)
    img.save(tmp_path / "x.jpg", quality=90, **kw)
    data, _ = io.read_encoded(tmp_path / "x.jpg")
    turbo = io._decode_jpeg_turbo(data, h, w, size)
    pil = io._decode_jpeg_reduced(data, size)
    assert turbo is not None and pil is not None
    assert turbo.shape == pil.shape and turbo.shape[0] == 3 and min(turbo.shape[1:]) >= size
    assert torch.equal(turbo, pil)
    assert torch.equal(decode_chw(data, size, 3), fit(pil, size, 3))  # decode_chw takes the turbo path


def test_jpeg_with_exif_takes_the_pil_path(tmp_path):
    from phalanx.data.imageio import jpeg_header
    img = photo(64, 96)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: only PIL applies it
    img.save(tmp_path / "r.jpg", quality=90, exif=exif)
    img.save(tmp_path / "n.jpg", quality=90)
    assert jpeg_header((tmp_path / "r.jpg").read_bytes()) == (64, 96, True)
    assert jpeg_header((tmp_path / "n.jpg").read_bytes()) == (64, 96, False)
    assert decode_chw(tmp_path / "r.jpg", 16, 3).shape == (3, 16, 16)


# ----------------------------------------------------------------------------- decompression bombs

def png_declaring(w: int, h: int) -> bytes:
    """A tiny PNG (one IDAT of a few compressed rows) whose header declares w x h gray pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (w + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    import phalanx.data.imageio as io_mod

    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(30000, 30000))
    assert path.stat().st_size < 2000

    def never(*a, **kw):
        raise AssertionError("the decoder was called")

    monkeypatch.setattr(io_mod, "_decode_torchvision", never)
    monkeypatch.setattr(io_mod, "_decode_pil", never)
    for decode in (lambda: decode_rgb(path), lambda: decode_chw(path, 32, 3), lambda: decode_to_uint8(path, 0, 1),
                   lambda: decode_chw(path.read_bytes(), 32, 1)):
        with pytest.raises(DecodeError) as e:
            decode()
        msg = str(e.value)
        assert "\n" not in msg and "declares 30000x30000 pixels, more than the limit of 178,956,970" in msg
    assert str(path) in str(pytest.raises(DecodeError, decode_chw, path, 32, 3).value)
    with pytest.raises(DecodeError, match="exceeds limit"):  # the header check `data prepare` applies: the same limit
        probe(path)


def test_the_limit_follows_pil_and_allows_images_up_to_it(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from phalanx.data.imageio import check_pixels, max_pixels
    assert max_pixels() == 2 * PILImage.MAX_IMAGE_PIXELS
    limit = max_pixels()
    check_pixels("ok.png", (1, limit))  # up to the limit: decoded as before
    with pytest.raises(DecodeError):
        check_pixels("big.png", (1, limit + 1))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(DecodeError, match="declares 11x10 pixels, more than the limit of 100"):
        check_pixels("x.png", (10, 11))
    check_pixels("x.png", (10, 10))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", None)
    check_pixels("x.png", (10**6, 10**6))


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "JPEG"])
def test_declared_size_reads_the_header_of_each_format(tmp_path, fmt):
    from phalanx.data.imageio import declared_size, sniff
    img = rgb(37, 53)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, fmt, **kw)
    data = path.read_bytes()
    assert declared_size(data, sniff(data[:16])) == (37, 53)
    if fmt == "WEBP":
        img.save(path, fmt, quality=80)  # lossy: the VP8 chunk
        data = path.read_bytes()
        assert declared_size(data, sniff(data[:16])) == (37, 53)
