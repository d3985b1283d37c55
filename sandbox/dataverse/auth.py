"""Entra ID stand-in: OIDC discovery, the client-credentials token endpoint, bearer-token checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sandbox.dataverse import errors
from sandbox.dataverse.errors import DataverseError
from sandbox.dataverse.store import Store

# The user rows of this org: the application user bound to the sandbox's client id, and the
# interactive "Dynamics user" on whose behalf the admin API edits rows.
ADMIN_USER_ID = "3c6b3f1e-5a2d-4c1f-9a70-5d1e00000001"
ADMIN_USER_NAME = "Sandbox Admin"
APP_USER_NAME = "# crm-sync sandbox app"


@dataclass(frozen=True)
class Identity:
    """The tenant, the app registration and the Dataverse environment it may call."""

    tenant_id: str
    client_id: str
    client_secret: str
    environment_url: str

    @property
    def app_user_id(self) -> str:
        """The application user's systemuserid (stable for a client id)."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox/user/{self.client_id}"))

    @property
    def business_unit_id(self) -> str:
        """The root business unit's id."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox/bu/{self.tenant_id}"))

    @property
    def organization_id(self) -> str:
        """The organisation's id."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox/org/{self.tenant_id}"))

    def user_names(self) -> dict[str, str]:
        """systemuserid -> full name, for lookup annotations."""
        return {self.app_user_id: APP_USER_NAME, ADMIN_USER_ID: ADMIN_USER_NAME}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenService:
    """Issues HMAC-signed JWT-shaped access tokens and checks them on every Web API call.

    The signing key and a "generation" number live in SQLite: tokens survive a restart, and
    `expire_all` (bumping the generation) invalidates every token issued so far.
    """

    def __init__(self, store: Store, identity: Identity, lifetime: int) -> None:
        self.store = store
        self.identity = identity
        self.default_lifetime = lifetime
        self.lifetime = lifetime
        self._key = bytes.fromhex(store.setting("signing_key") or "")
        self.generation = store.counter("token_generation")

    def issue(self) -> str:
        """A new access token for the application user."""
        now = int(time.time())
        claims = {
            "aud": self.identity.environment_url,
            "iss": f"https://sts.windows.net/{self.identity.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime,
            "appid": self.identity.client_id,
            "tid": self.identity.tenant_id,
            "oid": self.identity.app_user_id,
            "sub": self.identity.app_user_id,
            "idtyp": "app",
            "ver": "1.0",
            "gen": self.generation,
            "uti": secrets.token_urlsafe(8),
        }
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{head}.{body}.{self._sign(f'{head}.{body}')}"

    def _sign(self, data: str) -> str:
        return _b64(hmac.new(self._key, data.encode(), hashlib.sha256).digest())

    def expire_all(self) -> int:
        """Invalidate every token issued so far; returns the new generation."""
        self.generation = self.store.bump_counter("token_generation")
        return self.generation

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """The claims of a valid `Authorization: Bearer` token, else a 401 DataverseError."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise self._unauthorized(
                errors.INVALID_AUTH_TICKET, "The request has no Authorization Bearer token."
            )
        token = authorization[7:].strip()
        parts = token.split(".")
        if len(parts) != 3 or not hmac.compare_digest(
            self._sign(f"{parts[0]}.{parts[1]}"), parts[2]
        ):
            raise self._invalid()
        try:
            claims: dict[str, Any] = json.loads(_unb64(parts[1]))
        except ValueError:
            raise self._invalid() from None
        if claims.get("aud") != self.identity.environment_url:
            raise self._invalid()
        if claims.get("exp", 0) <= time.time() or claims.get("gen") != self.generation:
            raise self._unauthorized(
                errors.EXPIRED_AUTH_TICKET, "The ticket specified for authentication is expired"
            )
        return claims

    def _invalid(self) -> DataverseError:
        return self._unauthorized(
            errors.INVALID_AUTH_TICKET,
            "The ticket specified for authentication didn't pass validation",
        )

    def _unauthorized(self, code: str, message: str) -> DataverseError:
        base = self.identity.environment_url
        challenge = (
            f"Bearer authorization_uri={base}/{self.identity.tenant_id}/oauth2/authorize, "
            f"resource_id={base}/"
        )
        return DataverseError(401, code, message, {"WWW-Authenticate": challenge})


class EntraError(Exception):
    """An OAuth error answer in Entra's shape (`error`, `error_description` with AADSTS code)."""

    def __init__(self, status: int, error: str, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.code = code
        self.message = message

    def response(self, correlation_id: str) -> JSONResponse:
        """The JSON error response."""
        trace_id = str(uuid.uuid4())
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        description = (
            f"AADSTS{self.code}: {self.message} Trace ID: {trace_id} "
            f"Correlation ID: {correlation_id} Timestamp: {stamp}"
        )
        return JSONResponse(
            {
                "error": self.error,
                "error_description": description,
                "error_codes": [self.code],
                "timestamp": stamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": f"https://login.microsoftonline.com/error?code={self.code}",
            },
            status_code=self.status,
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )


def entra_router(identity: Identity, tokens: TokenService) -> APIRouter:
    """The Entra ID endpoints MSAL uses for a confidential client with `instance_discovery=False`
    (and instance discovery too, for clients that leave it on)."""
    router = APIRouter(tags=["Entra ID"])
    base = identity.environment_url

    def check_tenant(tenant: str) -> None:
        if tenant.lower() != identity.tenant_id.lower():
            raise EntraError(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                "and are signing into the correct cloud.",
            )

    def openid_configuration(tenant: str) -> dict[str, Any]:
        authority = f"{base}/{tenant}"
        return {
            "token_endpoint": f"{authority}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{authority}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{authority}/v2.0",
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{authority}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{authority}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{authority}/oauth2/v2.0/logout",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        }

    @router.get("/common/discovery/instance")
    async def instance_discovery(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "tenant_discovery_endpoint": (
                    f"{base}/{identity.tenant_id}/v2.0/.well-known/openid-configuration"
                ),
                "api-version": "1.1",
                "metadata": [],
            }
        )

    @router.get("/{tenant}/v2.0/.well-known/openid-configuration")
    async def discovery(tenant: str, request: Request) -> JSONResponse:
        try:
            check_tenant(tenant)
        except EntraError as exc:
            return exc.response(request.headers.get("client-request-id", str(uuid.uuid4())))
        return JSONResponse(openid_configuration(tenant))

    @router.post("/{tenant}/oauth2/v2.0/token")
    async def token(tenant: str, request: Request) -> JSONResponse:
        correlation_id = request.headers.get("client-request-id", str(uuid.uuid4()))
        try:
            check_tenant(tenant)
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            _check_token_request(form, request.headers.get("authorization"), identity, tenant)
        except EntraError as exc:
            return exc.response(correlation_id)
        return JSONResponse(
            {
                "token_type": "Bearer",
                "expires_in": tokens.lifetime,
                "ext_expires_in": tokens.lifetime,
                "access_token": tokens.issue(),
            },
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    return router


def _basic_credentials(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:].strip()).decode()
    except ValueError:
        return None, None
    user, _, password = decoded.partition(":")
    return unquote_plus(user), unquote_plus(password)


def _check_token_request(
    form: dict[str, str], authorization: str | None, identity: Identity, tenant: str
) -> None:
    """Validate a client-credentials request in the order Entra reports problems."""

    def missing(name: str) -> EntraError:
        return EntraError(
            400,
            "invalid_request",
            900144,
            f"The request body must contain the following parameter: '{name}'.",
        )

    grant = form.get("grant_type")
    if not grant:
        raise missing("grant_type")
    if grant != "client_credentials":
        raise EntraError(
            400,
            "unsupported_grant_type",
            70003,
            f"The app requested an unsupported grant type '{grant}'.",
        )
    basic_id, basic_secret = _basic_credentials(authorization)
    client_id = form.get("client_id") or basic_id
    if not client_id:
        raise missing("client_id")
    if client_id.lower() != identity.client_id.lower():
        raise EntraError(
            400,
            "unauthorized_client",
            700016,
            f"Application with identifier '{client_id}' was not found in the directory "
            f"'{tenant}'. This can happen if the application has not been installed by the "
            "administrator of the tenant or consented to by any user in the tenant.",
        )
    secret = form.get("client_secret") or basic_secret
    if not secret:
        raise EntraError(
            401,
            "invalid_client",
            7000216,
            "'client_assertion', 'client_secret' or 'request' is required for the "
            "'client_credentials' grant type.",
        )
    if not hmac.compare_digest(secret.encode(), identity.client_secret.encode()):
        raise EntraError(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the "
            f"client secret value, not the client secret ID, for a secret added to app "
            f"'{identity.client_id}'.",
        )
    scope = form.get("scope")
    if not scope:
        raise missing("scope")
    scopes = scope.split()
    if len(scopes) != 1 or not scopes[0].endswith("/.default"):
        raise EntraError(
            400,
            "invalid_scope",
            1002012,
            f"The provided value for scope {scope} is not valid. Client credential flows must "
            "have a scope value with /.default suffixed to the resource identifier "
            "(application ID URI).",
        )
    resource = scopes[0][: -len("/.default")].rstrip("/")
    if resource.lower() != identity.environment_url.rstrip("/").lower():
        raise EntraError(
            400,
            "invalid_resource",
            500011,
            f"The resource principal named {resource} was not found in the tenant named "
            f"{tenant}. This can happen if the application has not been installed by the "
            "administrator of the tenant or consented to by any user in the tenant.",
        )
