"""The README and docs/ say what the code does: the configuration table lists every key of
config.KEYS with its default, the keys a reload cannot change are the table's, and every
link between the documents leads to a file."""
import glob
import os
import re

from gimapproxy.config import KEYS, RESTART_KEYS

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
README = os.path.join(REPO, 'README.md')


def section(text, heading):
    """The text under `## heading`, up to the next `## ` heading."""
    start = text.index('\n## %s\n' % heading)
    end = text.find('\n## ', start + 1)
    return text[start:end if end >= 0 else len(text)]


def readme_table():
    """{key: default} from the README's configuration table, with None for (required)
    and '' for `-`. A row may name several keys (`a`, `b`) with their defaults in the same
    order (x, y); a key named twice fails."""
    rows = [line for line in section(open(README).read(), 'Configuration').splitlines()
            if line.startswith('| `')]
    assert rows
    table = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip('|').split(' | ')]
        names = re.findall(r'`(\w+)`', cells[0])
        assert cells[0] == ', '.join('`%s`' % name for name in names), row
        defaults = cells[1].split(', ')
        assert len(defaults) == len(names), row
        for name, default in zip(names, defaults):
            assert name not in table, 'listed twice: %s' % name
            table[name] = {'(required)': None, '-': ''}.get(default, default)
    return table


def test_readme_table_lists_every_key_with_its_default():
    table = readme_table()
    keys = {key.name: key.default for key in KEYS}
    assert sorted(set(keys) - set(table)) == [], 'missing from the README'
    assert sorted(set(table) - set(keys)) == [], 'not keys of config.KEYS'
    for name, default in keys.items():
        assert table[name] == default, name


def test_readme_names_the_keys_that_need_a_restart():
    signals = re.search(r'\*\*Signals\*\*:(.*?)\n- ', open(README).read(), re.S).group(1)
    listed = re.search(r'each key\s+that needs a restart \(([^)]*)\)', signals).group(1)
    assert set(re.findall(r'`(\w+)`', listed)) == RESTART_KEYS


def test_links_between_documents_lead_to_files():
    documents = [README, os.path.join(REPO, 'benchmarks', 'README.md')] + \
        glob.glob(os.path.join(REPO, 'docs', '*.md'))
    for document in documents:
        for target in re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', open(document).read()):
            if '://' in target:
                continue
            path = os.path.join(os.path.dirname(document), target)
            assert os.path.exists(path), '%s links to %s' % (os.path.relpath(document, REPO),
                                                              target)
