"""Microsoft Entra ID app tokens through MSAL (client credentials), cached and renewable."""

from __future__ import annotations

import threading
from typing import Any

import msal
import requests

from crm_connectors.errors import (
    ApiConnectionError,
    AuthenticationError,
    TlsError,
    UnknownHostError,
    tls_failure,
    unknown_host,
)

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"


class TokenSource:
    """Bearer tokens for one app registration and one resource.

    MSAL keeps the token in its in-memory cache and asks Entra ID for a new one once less than
    five minutes of it are left, so a cached token is never sent close to its expiry. The MSAL
    application (whose constructor talks to the network) is built on first use.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        tenant_id: str,
        resource: str,
        http_client: requests.Session,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
    ) -> None:
        self._client_id = client_id
        self._client_secret = client_secret
        self._authority = f"{authority_host.rstrip('/')}/{tenant_id}"
        self._scopes = [f"{resource.rstrip('/')}/.default"]
        self.http_client = http_client
        self._app: msal.ConfidentialClientApplication | None = None
        self._lock = threading.Lock()
        self.issued = 0

    def token(self) -> str:
        """A valid access token (from the cache when it has one)."""
        with self._lock:
            try:
                result = self._application().acquire_token_for_client(scopes=self._scopes)
            except ValueError as error:
                # MSAL could not read the authority's OpenID configuration (wrong tenant or host).
                raise AuthenticationError(
                    str(error),
                    service="entra-id",
                    method="GET",
                    endpoint=self._authority,
                ) from None
            except requests.exceptions.SSLError as error:
                raise TlsError(
                    tls_failure(self._authority, error),
                    service="entra-id",
                    method="POST",
                    endpoint=self._authority,
                ) from None
            except requests.RequestException as error:
                host = unknown_host(error)
                if host is not None:
                    raise UnknownHostError(
                        host,
                        service="entra-id",
                        method="POST",
                        endpoint=self._authority,
                    ) from None
                raise ApiConnectionError(
                    f"token request failed: {type(error).__name__}",
                    maybe_sent=False,
                    service="entra-id",
                    method="POST",
                    endpoint=self._authority,
                ) from None
            if "access_token" not in result:
                raise AuthenticationError(
                    f"Entra ID refused the token request ({result.get('error', 'unknown error')})",
                    service="entra-id",
                    method="POST",
                    endpoint=self._authority,
                    code=str(result.get("error") or "") or None,
                )
            if result.get("token_source") != "cache":
                self.issued += 1
            return str(result["access_token"])

    def invalidate(self) -> None:
        """Forget the cached token (the API refused it), so the next `token()` fetches anew."""
        with self._lock:
            if self._app is not None:
                self._app.remove_tokens_for_client()

    def _application(self) -> msal.ConfidentialClientApplication:
        if self._app is None:
            options: dict[str, Any] = {
                "client_credential": self._client_secret,
                "authority": self._authority,
                "http_client": self.http_client,
                # Instance discovery asks login.microsoftonline.com about the authority host,
                # which fails for a sovereign-cloud or local authority; the tenant's own OpenID
                # configuration is still fetched and checked.
                "instance_discovery": False,
            }
            self._app = msal.ConfidentialClientApplication(self._client_id, **options)
        return self._app
