import re

from setuptools import setup

with open('gimapproxy/__init__.py', encoding='utf-8') as handle:
    VERSION = re.search(r"__version__ = '([^']+)'", handle.read()).group(1)

# /metrics (Prometheus) on stats_listen; without it /metrics answers 501 and says to
# install the extra. /stats and /admin need nothing more.
METRICS = ['prometheus_client>=0.16']

setup(
    name='gimapproxy',
    version=VERSION,
    description='A connection-caching IMAP proxy for webmail, built on gevent',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='MIT',
    packages=['gimapproxy'],
    scripts=['bin/gimapproxy'],
    python_requires='>=3.8',
    # For each Python, the oldest gevent with wheels for it (greenlet comes with gevent,
    # in the versions that gevent release needs). docs/compatibility.md.
    install_requires=['gevent>=21.12; python_version<"3.11"',
                      'gevent>=22.10.1; python_version=="3.11"',
                      'gevent>=23.7; python_version=="3.12"',
                      'gevent>=24.10.1; python_version>="3.13"',
                      'docopt-ng>=0.9'],
    extras_require={
        'metrics': METRICS,
        # pymap needs Python 3.11; on older Pythons its tests skip (Dovecot's run).
        'test': ['pytest>=7', 'pytest-timeout>=2', 'pymap>=0.36; python_version>="3.11"',
                 'trustme>=1.0', 'supervisor>=4', 'hypothesis>=6'] + METRICS,
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.8',
        'Programming Language :: Python :: 3.9',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Communications :: Email :: Post-Office :: IMAP',
    ],
)
