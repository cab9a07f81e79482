"""ezssh: passwordless SSH for Azure (the command-line client).

Keep this module free of imports: `ezssh --help` and the cached-certificate path of `ezssh ssh`
must start without loading msal, requests or cryptography.
"""

__version__ = "0.1.0"
