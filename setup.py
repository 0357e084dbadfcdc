import re

from setuptools import setup

with open('gimapproxy/__init__.py', encoding='utf-8') as handle:
    VERSION = re.search(r"__version__ = '([^']+)'", handle.read()).group(1)

setup(
    name='gimapproxy',
    version=VERSION,
    description='A connection-caching IMAP proxy for webmail, built on gevent',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='MIT',
    packages=['gimapproxy'],
    scripts=['bin/gimapproxy'],
    python_requires='>=3.10',
    install_requires=['gevent>=22.10', 'greenlet>=2.0', 'docopt-ng>=0.9',
                      'prometheus_client>=0.16'],
    extras_require={
        'test': ['pytest>=7', 'pytest-timeout>=2', 'pymap>=0.36', 'trustme>=1.0',
                 'supervisor>=4', 'hypothesis>=6'],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Communications :: Email :: Post-Office :: IMAP',
    ],
)
