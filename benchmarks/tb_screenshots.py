"""TensorBoard as a user sees it: screenshots of a finished digits run in headless Chromium.

    apt-get install -y chromium && pip install websocket-client    # once (not in requirements)
    python benchmarks/tb_screenshots.py --train [--epochs 6]      # train the run, then shoot
    python benchmarks/tb_screenshots.py --tb_run DIR --projector DIR   # an existing run

Not run by the tests. ``--train`` pretrains SupCon on digits with demo_digits.sh's settings and
``--online_probe`` (``--epochs`` epochs, ``--print_freq 3`` so ``loss_step`` has points; a run
whose last.pth exists is reused), then draws ``main_tsne.py --projector`` of its last.pth. The
run's TensorBoard folder and the projector folder are copied into one temporary log folder,
TensorBoard serves it, and Chromium (driven over the DevTools protocol, so each page gets real
seconds to fetch its data and render) saves under ``--out``: ``tb_scalars.png`` (loss, loss_step,
probe_acc, probe_loss on the time series dashboard), ``tb_images.png`` (the views grid),
``tb_projector.png`` (the features with their thumbnails) and ``tb_hparams.png``.
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# the time series dashboard's tag filter, typed in (its legacy SCALARS tab drew no lines headless)
FILTER_TAGS = """(() => {
  document.querySelector('button[aria-label="Close side pane"]').click();
  const input = [...document.querySelectorAll('input')]
    .find(i => i.placeholder == 'Filter tags (regex)');
  input.value = '^(loss|loss_step|probe_acc|probe_loss)$';
  input.dispatchEvent(new Event('input', {bubbles: true}));
})()"""
PAGES = {  # file: (TensorBoard URL fragment, seconds to wait, script to run then, seconds after)
    'tb_scalars.png': ('#timeseries', 15, FILTER_TAGS, 15),
    'tb_images.png': ('#images', 10, None, 0),
    'tb_projector.png': ('#projector', 40, None, 0),
    'tb_hparams.png': ('#hparams', 12, None, 0),
}


def train(epochs, work):
    """The digits run and its projector files; returns (TensorBoard folder, projector folder)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    common = ['--dataset', 'digits', '--model', 'resnet18', '--size', '12', '--amp']
    common += ['--num_workers', '1', '--seed', '0']
    args = common + ['--method', 'SupCon', '--batch_size', '128', '--learning_rate', '0.03']
    args += ['--temp', '0.1', '--cosine', '--epochs', str(epochs), '--save_freq', str(epochs)]
    args += ['--print_freq', '3', '--online_probe', '--trial', 'tb_screenshots']
    import main_supcon

    opt = main_supcon.parse_option(args)
    ckpt = Path(work) / opt.save_folder / 'last.pth'
    if not ckpt.exists():  # a finished run is reused: only the pictures are taken again
        subprocess.run([sys.executable, str(REPO / 'main_supcon.py')] + args, cwd=work, env=env,
                       check=True)  # fmt: skip
    out = ckpt.with_name('last_tsne_encoder.png')
    tsne = common + ['--ckpt', str(ckpt), '--out', str(out), '--projector']
    subprocess.run([sys.executable, str(REPO / 'main_tsne.py')] + tsne, cwd=work, env=env,
                   check=True)  # fmt: skip
    return Path(work) / opt.tb_folder, out.with_name('last_tsne_encoder_projector')


def wait_for(url, seconds=60):
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, width, height, port=9333):
        import websocket  # websocket-client

        self.profile = tempfile.mkdtemp(prefix='chromium-')
        self.proc = subprocess.Popen(
            ['chromium', '--headless=new', '--no-sandbox', '--disable-dev-shm-usage',
             '--hide-scrollbars', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
             f'--remote-debugging-port={port}', f'--user-data-dir={self.profile}',
             f'--window-size={width},{height}', 'about:blank'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        targets = wait_for(f'http://127.0.0.1:{port}/json')
        page = next(t for t in targets if t['type'] == 'page')
        self.socket = websocket.create_connection(page['webSocketDebuggerUrl'], timeout=120)
        self.next_id = 0
        self.call('Page.enable')
        self.call(
            'Emulation.setDeviceMetricsOverride',
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method, **params):
        self.next_id += 1
        self.socket.send(json.dumps({'id': self.next_id, 'method': method, 'params': params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get('id') == self.next_id:
                if 'error' in message:
                    raise RuntimeError(f'{method}: {message["error"]}')
                return message.get('result', {})

    def screenshot(self, url, path, seconds, script=None, seconds_after=0):
        self.call('Page.navigate', url=url)
        time.sleep(seconds)  # real time: TensorBoard's pages fetch their data after loading
        if script:
            result = self.call('Runtime.evaluate', expression=script)
            if 'exceptionDetails' in result:
                raise RuntimeError(f'{url}: {result["exceptionDetails"]}')
            time.sleep(seconds_after)
        data = self.call('Page.captureScreenshot', format='png')['data']
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        self.socket.close()
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--train', action='store_true', help='train the run first')
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--work', type=Path, default=REPO, help='where --train saves (./save/)')
    parser.add_argument('--tb_run', type=Path, help='the TensorBoard folder of a finished run')
    parser.add_argument('--projector', type=Path, help='main_tsne.py --projector\'s folder')
    parser.add_argument('--out', type=Path, default=REPO / 'figures')
    parser.add_argument('--port', type=int, default=6123)
    parser.add_argument('--size', default='1400x1000', help='browser window, WIDTHxHEIGHT')
    args = parser.parse_args()
    if args.train:
        args.tb_run, args.projector = train(args.epochs, args.work)
    if args.tb_run is None or args.projector is None:
        parser.error('pass --train, or both --tb_run and --projector')

    logdir = Path(tempfile.mkdtemp(prefix='tb-'))
    shutil.copytree(args.tb_run, logdir / args.tb_run.name)
    shutil.copytree(args.projector, logdir / 'tsne_projector')
    tensorboard = subprocess.Popen(
        [sys.executable, '-m', 'tensorboard.main', '--logdir', str(logdir), '--port',
         str(args.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    width, height = (int(v) for v in args.size.split('x'))
    browser = None
    try:
        runs = wait_for(f'http://localhost:{args.port}/data/runs')
        print(f'TensorBoard serves the runs {runs}', flush=True)
        browser = Browser(width, height)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, (fragment, *timing) in PAGES.items():
            start = time.time()
            browser.screenshot(f'http://localhost:{args.port}/{fragment}', args.out / name, *timing)
            print(f'wrote {args.out / name} ({time.time() - start:.0f} s)', flush=True)
    finally:
        if browser is not None:
            browser.close()
        tensorboard.terminate()
        tensorboard.wait()
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == '__main__':
    main()
