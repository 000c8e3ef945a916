"""README.md and docs/: short, linked, opening with the fresh-machine commands, and every
command line in their code blocks uses only flags its script really has.

No training: the only processes started are one ``python main_X.py --help`` per script.
"""

import contextlib
import functools
import importlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, script_env

README = REPO / 'README.md'
DOCS = sorted((REPO / 'docs').glob('*.md'))
PAGES = [README] + DOCS
MAX_README_LINES = 300
FIRST_COMMANDS = [
    'pip install -r requirements.txt && bash demo_digits.sh',
    'pip install -r requirements-dev.txt && python -m pytest -q -n 2 tests',
]
LAUNCHERS = re.compile(r'^(python(3(\.\d+)?)?|torchrun)$')
ENTRY_SCRIPT = re.compile(r'^main_\w+\.py$')
# shell operators that end one command (the next may be another script)
SEPARATORS = {'|', '||', '&&', '&', ';'}


# ------------------------------------------------------------------------- reading markdown


def fenced_blocks(text):
    """[(first line number, [lines])] of every fenced code block (``` or ~~~)."""
    blocks, current, fence = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None:
            match = re.match(r'^(`{3,}|~{3,})', stripped)
            if match:
                fence, current = match.group(1), (number + 1, [])
        elif stripped.startswith(fence) and not stripped[len(fence) :].strip():
            blocks.append(current)
            current = None
        else:
            current[1].append(line)
    return blocks


def prose(text):
    """The text outside fenced code blocks, line numbers kept (code lines become empty)."""
    inside = set()
    for start, lines in fenced_blocks(text):
        inside.update(range(start - 1, start + len(lines) + 1))
    return '\n'.join(
        '' if number in inside else line for number, line in enumerate(text.splitlines(), 1)
    )


def logical_lines(block):
    """A code block's lines with backslash continuations joined: [(line offset, text)]."""
    joined, start, parts = [], None, []
    for offset, line in enumerate(block):
        if start is None:
            start = offset
        if line.rstrip().endswith('\\'):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        joined.append((start, ' '.join(parts)))
        start, parts = None, []
    if parts:
        joined.append((start, ' '.join(parts)))
    return joined


def entry_commands(text):
    """[(line number, script, [--flags], None) or (line number, None, None, problem)] of every
    ``python main_X.py ...`` / ``torchrun ... main_X.py ...`` in a fenced block of ``text``."""
    found = []
    for start, block in fenced_blocks(text):
        for offset, line in logical_lines(block):
            number = start + offset
            if not re.search(r'main_\w+\.py', line):
                continue
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as exc:
                found.append((number, None, None, f'cannot split {line!r}: {exc}'))
                continue
            segment = []
            for token in tokens + [';']:
                if token in SEPARATORS or re.match(r'^\d*>', token):
                    command = command_in(segment)
                    if command:
                        found.append((number, *command, None))
                    segment = []
                else:
                    segment.append(token)
    return found


def command_in(tokens):
    """(script, [--flags]) when ``tokens`` run an entry script, else None."""
    for i, token in enumerate(tokens):
        if LAUNCHERS.match(Path(token).name):
            scripts = [j for j in range(i + 1, len(tokens)) if tokens[j].endswith('.py')]
            if scripts and ENTRY_SCRIPT.match(Path(tokens[scripts[0]]).name):
                j = scripts[0]
                flags = [t.split('=', 1)[0] for t in tokens[j + 1 :] if t.startswith('--')]
                return tokens[j], flags
            return None
    return None


def github_slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(path):
    seen, result = {}, set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
        if match:
            slug = github_slug(match.group(1))
            result.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
            seen[slug] = seen.get(slug, 0) + 1
    return result


def relative_links(path):
    """[(target, anchor)] of every link and image outside code blocks that is not a URL."""
    text = prose(path.read_text())
    text = re.sub(r'`[^`\n]*`', '', text)  # inline code is not a link
    targets = re.findall(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', text)
    targets += re.findall(r'<(?:img|a)\b[^>]*?\b(?:src|href)="([^"]+)"', text)
    links = []
    for target in targets:
        if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition('#')
        links.append((file, anchor))
    return links


# ------------------------------------------------------------------------- the scripts' --help


_HELP = {}


# Runs each script given as ``python <script> --help`` would (argv, ``__main__``), one after the
# other in one interpreter: torch is imported once instead of once per script
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    text = io.StringIO()
    sys.argv = [path, '--help']
    with contextlib.redirect_stdout(text):
        try:
            runpy.run_path(path, run_name='__main__')
        except SystemExit as exit:
            assert exit.code in (0, None), (path, exit.code)
    out[path] = text.getvalue()
print(json.dumps(out))
"""


def prefetch_help(scripts):
    """The output of ``python <script> --help`` of every script not yet seen, from one process
    (each interpreter start imports torch: seconds), kept for the session."""
    todo = sorted({Path(script).name for script in scripts} - _HELP.keys())
    paths = [str(REPO / name) for name in todo if (REPO / name).is_file()]
    if not paths:
        return
    done = subprocess.run(
        [sys.executable, '-c', HELP_DRIVER, *paths],
        cwd=str(REPO),
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f'--help of {todo}: rc={done.returncode}\n{done.stderr[-2000:]}'
    for path, out in json.loads(done.stdout.splitlines()[-1]).items():
        _HELP[Path(path).name] = out


def help_text(script):
    prefetch_help([script])
    return _HELP[Path(script).name]


def options_in_help(text):
    """The option strings argparse lists: the lines indented by exactly two spaces."""
    options = set()
    for line in text.splitlines():
        match = re.match(r'^  (-\S.*?)(?: {2,}|$)', line)
        if match:
            options.update(re.findall(r'--[A-Za-z0-9][\w-]*', match.group(1)))
    return options


def help_options(script):
    return options_in_help(help_text(Path(script).name))


@functools.cache
def inprocess_help_options(script):
    """The options of ``<script> --help`` printed by its parser in this process (no torch start;
    ``test_the_help_parser_reads_argparse_option_lines`` holds them against the scripts')."""
    module = importlib.import_module(Path(script).stem)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_option(['--help'])
    return options_in_help(out.getvalue())


def flag_problems(text, where, options_of=help_options):
    """One line per flag of a command in ``text`` that its script's --help does not list."""
    problems = []
    for number, script, flags, problem in entry_commands(text):
        if problem:
            problems.append(f'{where}:{number}: {problem}')
            continue
        if not (REPO / Path(script).name).is_file():
            problems.append(f'{where}:{number}: {script} is not a script of the repository')
            continue
        known = options_of(script)
        for flag in flags:
            if flag not in known:
                problems.append(f'{where}:{number}: {Path(script).name} has no {flag}')
    return problems


# ------------------------------------------------------------------------- the tests


def test_readme_fits_on_a_few_screens():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f'README.md has {len(lines)} lines'


def test_readme_opens_with_the_two_fresh_machine_commands():
    start, block = fenced_blocks(README.read_text())[0]
    assert start <= 8, f'the first code block starts at line {start}, not at the top'
    commands = [re.sub(r'\s+#.*$', '', line).strip() for line in block if line.strip()]
    assert commands[:2] == FIRST_COMMANDS


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, 'docs/ holds no page'
    linked = {(REPO / file).resolve() for file, _ in relative_links(README) if file}
    missing = [page.name for page in DOCS if page.resolve() not in linked]
    assert not missing, f'README.md does not link docs/{missing}'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_its_heading(page):
    links = relative_links(page)
    broken = []
    for file, anchor in links:
        target = (page.parent / file).resolve() if file else page
        if not target.exists():
            broken.append(f'{file}: no such file')
        elif anchor and target.suffix == '.md' and anchor not in anchors(target):
            broken.append(f'{file}#{anchor}: no such heading in {target.relative_to(REPO)}')
    assert not broken, f'{page.relative_to(REPO)}: ' + '; '.join(broken)


def test_every_command_flag_is_one_the_script_has():
    problems, seen = [], 0
    for page in PAGES:
        text = page.read_text()
        seen += len(entry_commands(text))
        problems += flag_problems(text, page.relative_to(REPO), inprocess_help_options)
    # the seed document's commands alone are more than this: the parser must find them
    assert seen >= 16, f'only {seen} commands found in README.md and docs/'
    assert not problems, '\n'.join(problems)


def test_the_flag_check_catches_a_misspelt_flag():
    text = '\n'.join(
        [
            'Prose is not checked: python main_supcon.py --not_a_flag',
            '```bash',
            'CUDA_VISIBLE_DEVICES=1 nohup python main_supcon.py --batch_size 4 --batch_sizee 4 &',
            'python main_linear.py --ckpt x.pth \\',
            '    --learning-rate 1   # a hyphen where the flag has an underscore',
            'torchrun --nproc_per_node 2 main_supcon.py --epochs=1 --ckpt x.pth > out.log',
            'pip install x && python main_ce.py --syncBN --no-channels_last',
            'python benchmarks/bench_train.py --rounds 3',
            '```',
        ]
    )
    commands = entry_commands(text)
    assert [(number, Path(script).name) for number, script, _, _ in commands] == [
        (3, 'main_supcon.py'),
        (4, 'main_linear.py'),
        (6, 'main_supcon.py'),
        (7, 'main_ce.py'),
    ]
    assert flag_problems(text, 'example', inprocess_help_options) == [
        'example:3: main_supcon.py has no --batch_sizee',
        'example:4: main_linear.py has no --learning-rate',
        'example:6: main_supcon.py has no --ckpt',  # main_linear.py's flag, not main_supcon.py's
    ]


@pytest.mark.slow
def test_the_help_parser_reads_argparse_option_lines():
    prefetch_help(['main_supcon.py', 'main_linear.py', 'main_ce.py'])  # one process for the three
    options = help_options('main_supcon.py')
    assert {
        '--help',
        '--batch_size',
        '--channels_last',
        '--no-channels_last',
        '--moco_k',
    } <= options
    # the parser in this process lists what the script's --help prints (the training scripts:
    # every main_*.py prints its --help from the same parse_option)
    for script in ('main_supcon.py', 'main_linear.py', 'main_ce.py'):
        assert inprocess_help_options(script) == help_options(script)
    # a flag named only in another flag's help text is not an option of its own
    assert options_in_help('  --a A       see --b\n                        --c or --d\n') == {'--a'}


def test_a_broken_link_and_a_missing_heading_are_found(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text(
        '# A `--flag` (title)\n\n[ok](#a---flag-title) [gone](missing.md) '
        '[url](https://example.org) `[code](not-a-link.md)`\n\n```\n[x](in-code.md)\n```\n'
    )
    assert anchors(page) == {'a---flag-title'}
    assert relative_links(page) == [('', 'a---flag-title'), ('missing.md', '')]
