"""Imagine and vision in headless chromium against a real node serving tiny real models.

The node runs ``--capabilities imagine,vision`` on random-weight diffusers and
BLIP models built here from configs (cached per machine, see
:func:`tiny_media_models`), so every answer is a real model's output through
the real query path. In the browser:

* imagine → an ``<img>`` appears whose natural size is the backend's output
  size and whose decoded pixels (drawn on a canvas) are exactly the PNG the
  node sent on the WebSocket;
* vision → an image given by the file input, by a dropped file (a real
  ``DataTransfer`` on a ``drop`` event) and by the webcam (chromium's fake
  capture device) goes to the node, and the text shown is exactly what the
  same BLIP model answers for those bytes, run in this test process;
* every query lowers the wallet by exactly the price quoted before Submit.

Screenshots of each state go to ``$MTOR_SCREENSHOT_DIR`` (else a temp dir).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.harness import NodeProcess
from tests.webui.conftest import FAST
from tests.webui.test_browser import ARGS, CHROMIUM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[inference]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[inference]')")
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
    reason=f"chromium is not installed at {CHROMIUM} (run scripts/install-browser.sh)",
)

#: Bump when the builders below change, so a stale cached model is not reused.
MODELS_VERSION = "media-v1"
#: First use loads torch and the model inside the node; on a busy 2-core machine that takes a while.
FIRST_ANSWER_MS = 300_000


def _cache_root() -> Path:
    return Path(os.environ.get("MTOR_TEST_CACHE", Path.home() / ".cache" / "mtor-node-tests"))


def build_fast_sd(out: Path) -> Path:
    """A tiny Stable Diffusion pipeline cheap at the node's default 512×512, 25 steps.

    The node asks for 512×512 (``ImagineRequest`` defaults); the VAE here
    downsamples by 16 so the UNet works on a 32×32 latent, and the UNet has
    16/32 channels. Random weights: the picture is noise, the pipeline is real.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.inference.tiny_models import write_clip_tokenizer

    torch.manual_seed(0)
    tok_dir = out.parent / f"{out.name}-tokenizer"
    vocab = write_clip_tokenizer(tok_dir)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 16, 16, 16], norm_num_groups=4, layers_per_block=1, in_channels=3,
        out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 5,
        up_block_types=["UpDecoderBlock2D"] * 5,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=77,
    ))
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir), unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(out)
    return out


def _cached(name: str, build) -> Path:
    """``build(dir)`` once per machine: built beside the cache, then renamed into place (atomic)."""
    final = _cache_root() / MODELS_VERSION / name
    if not final.exists():
        work = final.parent / f".{name}-building-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        build(work / name)
        try:
            os.rename(work / name, final)
        except OSError:  # another run put it there first
            pass
        shutil.rmtree(work, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def tiny_media_models() -> dict[str, Path]:
    from tests.inference.tiny_models import build_tiny_blip

    return {"imagine": _cached("tiny-sd-512", build_fast_sd), "vision": _cached("tiny-blip", build_tiny_blip)}


@pytest.fixture(scope="module")
def media_node(tmp_path_factory, tiny_media_models):
    env = {**FAST, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # 25 denoising steps at 512×512 on a shared 2-core CPU can pass the default 30 s worker limit.
           "MTOR_QUEUE_QUERY_TIMEOUT_S": "150",
           "MTOR_INFERENCE_IMAGINE_MODEL_DIR": str(tiny_media_models["imagine"]),
           "MTOR_INFERENCE_VISION_MODEL_DIR": str(tiny_media_models["vision"])}
    proc = NodeProcess(tmp_path_factory.mktemp("media-node"), extra_args=("--capabilities", "imagine,vision"),
                       env=env).start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()
    print(proc.output[-3000:])
    assert "Traceback" not in proc.output, proc.output


@pytest.fixture(scope="module")
def vision_reference(tiny_media_models):
    """The node's vision model, loaded in this process: what it says about given bytes."""
    from inference.base import CancelToken, no_progress
    from inference.vision import VisionBackend, VisionRequest

    backend = VisionBackend(tiny_media_models["vision"])
    backend.load()

    def answer(image: bytes, prompt: str) -> str:
        return backend.run(VisionRequest(image, prompt), no_progress, CancelToken()).text

    yield answer
    backend.unload()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = Path(os.environ["MTOR_SCREENSHOT_DIR"]) if os.environ.get("MTOR_SCREENSHOT_DIR") else \
        tmp_path_factory.mktemp("screenshots")
    where.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {where}")
    return where


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class Wire:
    """Every JSON message on the page's ``/ws``, both ways, as Playwright saw it."""

    def __init__(self, page) -> None:
        self.sent: list[dict] = []
        self.received: list[dict] = []
        page.on("websocket", self._attach)

    def _attach(self, ws) -> None:
        ws.on("framesent", lambda payload: self._keep(self.sent, payload))
        ws.on("framereceived", lambda payload: self._keep(self.received, payload))

    @staticmethod
    def _keep(into: list, payload) -> None:
        try:
            into.append(json.loads(payload))
        except (TypeError, ValueError):
            pass

    def last(self, direction: str, kind: str) -> dict:
        found = [m for m in getattr(self, direction) if m.get("type") == kind]
        assert found, f"no {kind} message {direction}"
        return found[-1]


@pytest.fixture
def page(browser, media_node):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.wire = Wire(page)
    page.goto(media_node.console_url)
    page.wait_for_selector("#connection.ok")
    page.wait_for_function("document.getElementById('welcome').textContent.startsWith('Welcome')")
    yield page
    context.close()
    assert not errors, errors


def wallet(page) -> dict:
    """The page's own wallet as the node's REST mirror reports it (same GUID cookie as the page)."""
    response = page.request.get(page.url.rstrip("/") + "/api/wallet")
    assert response.ok, response.text()
    return response.json()


def available_units(page) -> int:
    units = wallet(page)["available_units"]
    assert float(page.text_content("#balance")) == pytest.approx(units / 1_000_000, abs=5e-4)  # shown as it is
    return units


def choose(page, query_type: str) -> int:
    """Pick ``query_type``; return the price (units) quoted for it, as shown before Submit."""
    page.select_option("#query-type", query_type)
    page.wait_for_function(f"MTORConsole.state.quote && MTORConsole.state.quote.query_type === {query_type!r}")
    quote = page.evaluate("MTORConsole.state.quote")
    assert quote["price_units"] > 0
    assert float(page.text_content("#price").split()[0]) == pytest.approx(quote["price_units"] / 1e6,
                                                                                        abs=5e-4)
    return quote["price_units"]


def wait_for_balance(page, units: int) -> None:
    """The page shows ``units`` (to its 3 decimals), and the node's wallet holds exactly that."""
    page.wait_for_function("(u) => Math.round(Number(document.getElementById('balance').textContent) * 1000)"
                           " === Math.round(u / 1000)", arg=units)
    assert available_units(page) == units


def png_bytes(size=(96, 64)) -> bytes:
    from PIL import Image

    image = Image.new("RGB", size)
    image.putdata([(x * 255 // size[0], y * 255 // size[1], 128) for y in range(size[1]) for x in range(size[0])])
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_imagine_shows_the_nodes_png_and_charges_the_quote(page, shots):
    from PIL import Image

    from inference.imagine import ImagineRequest

    before = available_units(page)
    price = choose(page, "imagine")
    page.fill("#prompt", "a red cat on a mat")
    page.screenshot(path=str(shots / "media-01-imagine-quoted.png"), full_page=True)
    page.click("#submit")
    page.wait_for_selector("#result-list li.done img", timeout=FIRST_ANSWER_MS)
    page.wait_for_function("document.querySelector('#result-list li.done img').complete && "
                           "document.querySelector('#result-list li.done img').naturalWidth > 0")
    result = page.wire.last("received", "query_result")
    assert result["result_type"] == "image" and result["query_type"] == "imagine"
    png = base64.b64decode(result["result"])
    decoded = Image.open(io.BytesIO(png))
    default = ImagineRequest("x")
    assert decoded.format == "PNG" and decoded.size == (default.width, default.height)

    shown = page.evaluate("""() => {
        const img = document.querySelector('#result-list li.done img');
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        const px = ctx.getImageData(0, 0, c.width, c.height).data;
        let bin = '';
        for (let i = 0; i < px.length; i += 8192) bin += String.fromCharCode.apply(null, px.subarray(i, i + 8192));
        return {src: img.src, w: img.naturalWidth, h: img.naturalHeight, rgba: btoa(bin)};
    }""")
    assert shown["src"] == "data:image/png;base64," + result["result"]
    assert (shown["w"], shown["h"]) == decoded.size
    assert base64.b64decode(shown["rgba"]) == decoded.convert("RGBA").tobytes()  # pixel for pixel

    assert result["cost_units"] == price
    wait_for_balance(page, before - price)
    unit = "token" if result["cost"] == 1 else "tokens"
    assert f"cost {result['cost']:g} {unit}" in page.text_content("#result-list li.done .meta")
    assert wallet(page)["recent_queries"][-1]["cost_units"] == price
    page.screenshot(path=str(shots / "media-02-imagine-done.png"), full_page=True)


def _vision_round(page, reference, shots, name: str, prompt: str, give_image) -> bytes:
    """Choose vision, give an image with ``give_image``, submit, check the answer and the charge.

    Returns the image bytes the page sent."""
    before = available_units(page)
    price = choose(page, "vision")
    page.wait_for_selector("#vision-tools:not(.hidden)")
    give_image(page)
    page.wait_for_selector("#image-preview:not(.hidden)")
    page.wait_for_function("document.getElementById('image-preview').naturalWidth > 0")
    page.fill("#prompt", prompt)
    page.click("#submit")
    page.wait_for_selector("#result-list li.done, #result-list li.error", timeout=FIRST_ANSWER_MS)
    assert not page.query_selector("#result-list li.error"), page.text_content("#result-list li.error")
    query = page.wire.last("sent", "submit_query")["query"]
    assert query["query_type"] == "vision" and query["prompt"] == prompt
    sent = base64.b64decode(query["image"].split(",", 1)[1])
    expected = reference(sent, prompt)
    assert expected.strip(), "the reference model gave an empty answer"
    assert page.text_content("#result-list li.done .body") == expected
    assert page.wire.last("received", "query_result")["cost_units"] == price
    wait_for_balance(page, before - price)
    page.screenshot(path=str(shots / f"media-{name}.png"), full_page=True)
    return sent


def test_vision_from_the_file_input(page, vision_reference, shots, tmp_path):
    image = tmp_path / "gradient.png"
    image.write_bytes(png_bytes())
    sent = _vision_round(page, vision_reference, shots, "03-vision-file", "what is this?",
                         lambda p: p.set_input_files("#image-input", str(image)))
    assert sent == image.read_bytes()


def test_vision_from_a_dropped_file(page, vision_reference, shots):
    data = png_bytes((40, 120))

    def drop(p):
        transfer = p.evaluate_handle("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            return dt;
        }""", base64.b64encode(data).decode())
        for event in ("dragenter", "dragover"):
            p.dispatch_event("#drop-zone", event, {"dataTransfer": transfer})
        p.wait_for_selector("#drop-zone.over")
        p.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
        p.wait_for_selector("#drop-zone:not(.over)")

    sent = _vision_round(page, vision_reference, shots, "04-vision-drop", "a photo of", drop)
    assert sent == data


def test_vision_from_the_webcam(page, vision_reference, shots):
    from PIL import Image

    def capture(p):
        p.click("#webcam-button")
        p.wait_for_function("(() => { const v = document.getElementById('webcam');"
                            " return v.srcObject && v.readyState >= 2 && v.videoWidth > 0; })()")
        p.screenshot(path=str(shots / "media-05-webcam-live.png"), full_page=True)
        assert p.text_content("#webcam-button") == "Take picture"
        p.click("#webcam-button")
        p.wait_for_function("document.getElementById('webcam').classList.contains('hidden')")

    sent = _vision_round(page, vision_reference, shots, "06-vision-webcam", "describe this", capture)
    picture = Image.open(io.BytesIO(sent))
    size = page.evaluate("[document.getElementById('image-preview').naturalWidth,"
                         " document.getElementById('image-preview').naturalHeight]")
    assert picture.format == "JPEG" and list(picture.size) == size
