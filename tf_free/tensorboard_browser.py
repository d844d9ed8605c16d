"""TensorBoard as a user sees it: a real `tensorboard` server and headless Chromium.

    with TensorBoard(logdir) as board, Browser(window_size=(1600, 1000)) as browser:
        board.wait_for_runs(["train", "robustness"])
        browser.set_tensorboard_settings(README_SETTINGS)
        browser.goto(board.url("timeseries", tagFilter="^train/"))
        browser.wait_for(TIMESERIES_DRAWN_JS)
        cards = scalar_cards(browser.dom())  # titles, drawn points, loading state
        browser.screenshot("timeseries.png")

`TensorBoard` starts `python -m tensorboard.main` on 127.0.0.1 and a free port in its own
process group, waits until it answers HTTP, and on exit (also after an exception) ends the
whole group (the server and its Rust data server).

`Browser` drives Debian's `chromium --headless=new` over the DevTools protocol (on
`--remote-debugging-pipe`: no websocket, no extra package). It waits for a condition in the
page rather than for a time: `--dump-dom` after a `--virtual-time-budget` left TensorBoard's
time-series cards empty in about half the runs here (the cards draw when an
IntersectionObserver sees them, which virtual time does not always let happen). It also reads
shadow roots (`deep_html`: the Polymer HParams dashboard draws inside them, which
`--dump-dom` does not print), seeds TensorBoard's settings before the app starts, and
screenshots an exact viewport.

The time-series line charts draw with WebGL on a <canvas> by default, which leaves nothing
to check in the DOM; `TensorBoard.url()` therefore asks for the SVG renderer with
`?forceSVG=true` (the query-parameter override of the `forceSvg` feature flag, found in
TensorBoard's webfiles.zip index.js), which draws each series as an SVG
<path d="M x,y L x,y ..."> with one command per point: `scalar_cards` reads them back.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import html.parser
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "install Debian's chromium: apt-get install chromium"

DEFAULT_WINDOW_SIZE = (1600, 1200)

# TensorBoard's persisted UI settings (localStorage "_tb_global_settings"; the keys of its
# settings converter in webfiles.zip index.js): for screenshots, no settings pane and no
# step-selector tables under the charts, and y ranges that show every point.
README_SETTINGS = {
    "timeSeriesSettingsPaneOpened": False,
    "stepSelectorEnabled": False,
    "ignoreOutliers": False,
}


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or timed out."""


class TensorBoardError(RuntimeError):
    """The tensorboard process did not start or did not load the runs."""


def _kill_group(pgid: int, sig: int) -> bool:
    """Sends `sig` (0: none) to a process group; False if no process is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def _stop_group(process: subprocess.Popen, *, grace: float = 0.0) -> None:
    """Ends the process group that `process` leads (start_new_session=True).

    SIGTERM first if `grace` > 0 (then up to `grace` s to exit), then SIGKILL to whatever
    is left, e.g. helpers that outlive the leader; returns once every process of the group
    is gone (reaped by us or by init).
    """
    pgid = process.pid  # a session leader's group id is its pid
    if grace > 0 and process.poll() is None:
        _kill_group(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(pgid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while _kill_group(pgid, signal.SIGKILL) and time.monotonic() < deadline:
        time.sleep(0.05)


# --- TensorBoard -------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """A `tensorboard --logdir=... --host=127.0.0.1 --port=<free>` subprocess.

    A context manager: `__enter__` returns once the server answers HTTP; `__exit__` kills
    its process group, also when the body raised.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        port: int | None = None,
        startup_timeout: float = 120.0,
        extra_flags: tuple[str, ...] = (),
    ):
        self.logdir = os.path.abspath(logdir)
        self.port = port
        self.startup_timeout = startup_timeout
        self.extra_flags = tuple(extra_flags)
        self.process: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> TensorBoard:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> TensorBoard:
        if self.process is not None:
            raise TensorBoardError("this TensorBoard was already started")
        if not os.path.isdir(self.logdir):
            raise TensorBoardError(f"--logdir {self.logdir} is not a folder")
        pick_port = self.port is None
        for attempt in range(3 if pick_port else 1):
            if pick_port:
                self.port = free_port()
            try:
                return self._start_once()
            except TensorBoardError as e:
                # Another process took the free port before tensorboard bound it: again.
                if "could not bind" not in str(e) or attempt == 2 or not pick_port:
                    raise
                self.process = None

    def _start_once(self) -> TensorBoard:
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                f"--logdir={self.logdir}",
                "--host=127.0.0.1",
                f"--port={self.port}",
                *self.extra_flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, which stop() ends
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                raise TensorBoardError(
                    f"tensorboard exited with status {self.process.returncode} before "
                    f"serving:\n{self.log_tail()}"
                )
            try:
                self.get("/data/environment", timeout=5)
                return
            except OSError:  # URLError, refused, reset, timed out
                pass
            if time.monotonic() > deadline:
                raise TensorBoardError(
                    f"tensorboard did not answer on {self.base_url} within "
                    f"{self.startup_timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 10 s, then waits until all are gone."""
        if self.process is None:
            return
        _stop_group(self.process, grace=10)  # with the Rust data server, if it runs
        if self._log is not None:
            self._last_log = self.log_tail()
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        """True while any process of the server's group exists."""
        if self.process is None:
            return False
        return self.process.poll() is None or _kill_group(self.process.pid, 0)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of tensorboard's own output (stdout and stderr)."""
        if self._log is None:
            return getattr(self, "_last_log", "")
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return response.read()

    def runs(self) -> list[str]:
        return json.loads(self.get("/data/runs"))

    def wait_for_runs(self, runs=(), timeout: float = 60.0) -> list[str]:
        """Waits until the server has loaded `runs` (with none given: any run); the runs."""
        deadline = time.monotonic() + timeout
        while True:
            loaded = self.runs()
            if set(runs) <= set(loaded) and (runs or loaded):
                return loaded
            if time.monotonic() > deadline:
                raise TensorBoardError(
                    f"tensorboard loaded the runs {loaded} from {self.logdir}, "
                    f"expected {sorted(runs) or 'some'}"
                )
            time.sleep(0.5)

    def tags(self, plugin: str = "scalars") -> dict[str, list[str]]:
        """{run: [tag, ...]} of a plugin's data ("scalars", "images", "histograms")."""
        return {
            run: sorted(tags)
            for run, tags in json.loads(self.get(f"/data/plugin/{plugin}/tags")).items()
        }

    def wait_for_tags(self, expected: dict, plugin: str = "scalars", timeout: float = 60.0):
        """Waits until every run in `expected` ({run: [tag, ...]}) has those tags loaded.

        The runs list comes first; a run's tags follow as the server reads its files. A page
        loaded before would show them only at its next auto-reload (30 s).
        """
        deadline = time.monotonic() + timeout
        while True:
            loaded = self.tags(plugin)
            missing = {
                run: sorted(set(tags) - set(loaded.get(run, ())))
                for run, tags in expected.items()
                if set(tags) - set(loaded.get(run, ()))
            }
            if not missing:
                return loaded
            if time.monotonic() > deadline:
                raise TensorBoardError(f"tensorboard has not loaded the {plugin} tags {missing}")
            time.sleep(0.5)

    def url(self, page: str = "timeseries", *, force_svg: bool = True, **query) -> str:
        """A dashboard's address, e.g. url("timeseries", tagFilter="^robustness/").

        `query` is TensorBoard's URL state (tagFilter, runFilter, smoothing); it goes
        before the #fragment that names the dashboard. None values are left out.
        """
        params = {"forceSVG": "true"} if force_svg else {}
        params.update({k: str(v) for k, v in query.items() if v is not None})
        search = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"{self.base_url}/{search}#{page}"


# --- Headless Chromium ---------------------------------------------------------------


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserError(
        f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}"
    )


def _chromium_command(profile: str, window_size: tuple[int, int], *flags: str) -> list[str]:
    return [
        find_chromium(),
        "--headless=new",
        "--no-sandbox",  # root in a container: no user namespaces for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-crash-reporter",
        "--disable-breakpad",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",  # a fresh profile: no settings from an earlier run
        f"--window-size={window_size[0]},{window_size[1]}",
        *flags,
    ]


def _fd_above(fd: int, low: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low + 1)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium page, driven over the DevTools protocol.

    The protocol runs over `--remote-debugging-pipe` (Chromium reads commands on fd 3 and
    writes replies and events on fd 4, JSON messages ended by NUL):
    https://chromedevtools.github.io/devtools-protocol/ . No websocket, no extra package.
    """

    def __init__(
        self, *, window_size: tuple[int, int] = DEFAULT_WINDOW_SIZE, timeout: float = 120.0
    ):
        self.window_size = tuple(window_size)
        self.timeout = timeout
        self.process: subprocess.Popen | None = None
        self._profile = None
        self._stderr = None
        self._to_chrome = self._from_chrome = None
        self._buffer = b""
        self._next_id = 0
        self._session = None

    def __enter__(self) -> Browser:
        find_chromium()  # the install hint, before anything is created
        self._profile = tempfile.TemporaryDirectory(prefix="tf_free_chromium_")
        self._stderr = tempfile.TemporaryFile()
        command = _chromium_command(
            self._profile.name, self.window_size, "--remote-debugging-pipe", "about:blank"
        )
        child_in, self._to_chrome = os.pipe()
        self._from_chrome, child_out = os.pipe()
        # The child's ends above fd 9, so that moving them to 3 and 4 clobbers nothing;
        # bash, because dash cannot redirect a descriptor above 9.
        child_in, child_out = _fd_above(child_in, 9), _fd_above(child_out, 9)
        shell = f'exec "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-'
        try:
            self.process = subprocess.Popen(
                ["bash", "-c", shell, "bash", *command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                pass_fds=(child_in, child_out),
                start_new_session=True,
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        try:
            targets = self._call("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            self._session = self._call(
                "Target.attachToTarget", targetId=page["targetId"], flatten=True
            )["sessionId"]
            self.call("Page.enable")  # without it, addScriptToEvaluateOnNewDocument did not run
            width, height = self.window_size
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                try:
                    self._send({"id": 0, "method": "Browser.close"})
                    self.process.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            _stop_group(self.process)
        for fd in (self._to_chrome, self._from_chrome):
            if fd is not None:
                os.close(fd)
        self._to_chrome = self._from_chrome = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stderr_tail(self, chars: int = 3000) -> str:
        """The end of Chromium's stderr (empty once the browser is closed)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-chars:]

    # The protocol ------------------------------------------------------------

    def _send(self, message: dict) -> None:
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"chromium did not answer within {self.timeout:.0f} s")
            ready, _, _ = select.select([self._from_chrome], [], [], remaining)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise BrowserError(
                        f"chromium closed the DevTools pipe (exited?):\n{self.stderr_tail()}"
                    )
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _call(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._send(message)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)  # events (no "id") are not needed here
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def call(self, method: str, **params) -> dict:
        """A DevTools command on the page, e.g. call("Page.navigate", url=...)."""
        return self._call(method, self._session, **params)

    # The page ----------------------------------------------------------------

    def set_tensorboard_settings(self, settings: dict) -> None:
        """Seeds TensorBoard's persisted settings in every page loaded from now on."""
        value = json.dumps(json.dumps(settings))
        self.call(
            "Page.addScriptToEvaluateOnNewDocument",
            source=f"localStorage.setItem('_tb_global_settings', {value});",
        )

    def goto(self, url: str) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"could not load {url}: {result['errorText']}")

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            error = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {error}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float | None = None, settle: float = 1.0):
        """Polls `expression` until it is truthy, waits `settle` s more; returns its value."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                time.sleep(settle)  # let the last frame (chart transitions) finish
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout:.0f} s in vain for: {expression[:300]}")
            time.sleep(0.25)

    def dom(self) -> str:
        """The light DOM, as `chromium --dump-dom` prints it (no shadow roots)."""
        return self.evaluate("document.documentElement.outerHTML")

    def deep_html(self) -> str:
        """The document's HTML with every open shadow root inlined (as <template>)."""
        return self.evaluate(_DEEP_HTML_JS)

    def screenshot(self, png_path: str | os.PathLike) -> str:
        """Writes a PNG of the viewport (`window_size`); returns its absolute path."""
        png_path = os.path.abspath(png_path)
        os.makedirs(os.path.dirname(png_path), exist_ok=True)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(png_path, "wb") as f:
            f.write(base64.b64decode(data))
        return png_path


# Element.getHTML serializes the shadow roots it is given (Chrome 125+):
# https://developer.mozilla.org/en-US/docs/Web/API/Element/getHTML
_DEEP_HTML_JS = """(() => {
  const roots = [];
  const visit = (node) => {
    for (const el of node.querySelectorAll("*")) {
      if (el.shadowRoot) { roots.push(el.shadowRoot); visit(el.shadowRoot); }
    }
  };
  visit(document);
  return document.documentElement.getHTML({shadowRoots: roots});
})()"""

# Time series: every card in the viewport has its data drawn: no progress bar, SVG lines in
# scalar cards, decoded images in image cards.
TIMESERIES_DRAWN_JS = """(() => {
  const inView = (selector) => [...document.querySelectorAll(selector)].filter((el) => {
    const r = el.getBoundingClientRect();
    return r.height > 0 && r.bottom > 0 && r.top < window.innerHeight;
  });
  const scalars = inView("scalar-card");
  const images = inView("image-card");
  const cards = [...scalars, ...images, ...inView("histogram-card")];
  return cards.length > 0
    && cards.every((c) => !c.querySelector("mat-progress-bar"))
    && scalars.every((c) => c.querySelector(".series-view svg path"))
    && images.every((c) => [...c.querySelectorAll("img")].some(
                             (i) => i.complete && i.naturalWidth > 0));
})()"""

# HParams: the table view lists at least one session group.
HPARAMS_TABLE_SHOWN_JS = """(() => {
  const cells = [];
  const visit = (node) => {
    for (const el of node.querySelectorAll("*")) {
      if (el.classList.contains("table-cell")) cells.push(el);
      if (el.shadowRoot) visit(el.shadowRoot);
    }
  };
  visit(document);
  return cells.length > 0;
})()"""


# --- Reading a dumped DOM ----------------------------------------------------------------

_VOID = {
    "area", "base", "br", "col", "embed", "hr", "img", "input",
    "link", "meta", "param", "source", "track", "wbr",
}  # fmt: skip


@dataclasses.dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list = dataclasses.field(default_factory=list)  # Elements and strings

    def iter(self, tag: str | None = None):
        """This element and its descendants, depth first; only `tag` ones if given."""
        if tag is None or self.tag == tag:
            yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter(tag)

    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _TreeBuilder(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        if tag not in _VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse_dom(dom: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(dom)
    builder.close()
    return builder.root


@dataclasses.dataclass
class ScalarCard:
    """A time-series scalar card of a DOM drawn with `?forceSVG=true`."""

    title: str
    lines: list[list[tuple[float, float]]]  # each visible drawn series' points, in pixels
    loading: bool  # its progress bar still shows

    def most_points(self) -> int:
        """The distinct x positions of its longest drawn line (0: nothing drawn)."""
        return max((len({x for x, _ in line}) for line in self.lines), default=0)


_NUMBER = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?)"
_POINT = re.compile(rf"[ML]\s*{_NUMBER}\s*,\s*{_NUMBER}")


def scalar_cards(dom: str | Element) -> list[ScalarCard]:
    """The time-series page's scalar cards: title, drawn lines, loading state.

    A card is a <scalar-card>; its title the text of its <tb-truncated-path>; its chart a
    <line-chart> whose <div class="series-view"> holds the SVG renderer's <svg>, with one
    <path d="M x,y L x,y ..."> per visible series and one command per point (TensorBoard's
    SvgRenderer.createPathDString). Hidden series (display: none) are left out.
    """
    root = parse_dom(dom) if isinstance(dom, str) else dom
    cards = []
    for card in root.iter("scalar-card"):
        title = next(card.iter("tb-truncated-path"), None)
        lines = []
        for view in card.iter("div"):
            if "series-view" not in view.classes():
                continue
            for svg in view.children:
                if not (isinstance(svg, Element) and svg.tag == "svg"):
                    continue
                for path in svg.children:
                    if not (isinstance(path, Element) and path.tag == "path"):
                        continue
                    if "display: none" in path.attrs.get("style", ""):
                        continue
                    points = _POINT.findall(path.attrs.get("d", ""))
                    lines.append([(float(x), float(y)) for x, y in points])
        cards.append(
            ScalarCard(
                title=" ".join(title.text().split()) if title else "",
                lines=lines,
                loading=next(card.iter("mat-progress-bar"), None) is not None,
            )
        )
    return cards


def hparams_table(dom: str | Element) -> tuple[list[str], list[str]]:
    """The HParams table view's header texts and cell texts, from a `deep_html` DOM."""
    root = parse_dom(dom) if isinstance(dom, str) else dom
    headers, cells = [], []
    for div in root.iter("div"):
        classes = div.classes()
        if "table-header" in classes:
            headers.append(" ".join(div.text().split()))
        elif "table-cell" in classes:
            cells.append(" ".join(div.text().split()))
    return headers, cells
