"""Entra ID stand-in: MSAL over the sandbox's TLS, token errors, expiry, and 401s on the Web API."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any

import msal
import pytest
import requests
from cryptography import x509

from sandbox.tls import ensure_certificates

pytestmark = pytest.mark.sandbox

GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def session(ca_path: str) -> requests.Session:
    """A session trusting only the sandbox CA (REQUESTS_CA_BUNDLE must not override it)."""
    http = requests.Session()
    http.verify = ca_path
    http.trust_env = False
    return http


def msal_app(sandbox: Any, **overrides: Any) -> msal.ConfidentialClientApplication:
    """MSAL configured from what an Airflow connection holds, nothing else."""
    creds = sandbox.credentials
    options: dict[str, Any] = {
        "client_credential": creds.client_secret,
        "authority": f"{sandbox.d365_url}/{creds.tenant_id}",
        "instance_discovery": False,
        "http_client": session(sandbox.ca_path),
    }
    options.update(overrides)
    return msal.ConfidentialClientApplication(creds.client_id, **options)


def token_request(sandbox: Any, tenant: str | None = None, **form: str) -> requests.Response:
    creds = sandbox.credentials
    data = {
        "grant_type": "client_credentials",
        "client_id": creds.client_id,
        "client_secret": creds.client_secret,
        "scope": f"{sandbox.d365_url}/.default",
    }
    data.update(form)
    data = {k: v for k, v in data.items() if v != ""}
    url = f"{sandbox.d365_url}/{tenant or creds.tenant_id}/oauth2/v2.0/token"
    return session(sandbox.ca_path).post(url, data=data, timeout=30)


def assert_entra_error(response: requests.Response, status: int, error: str, code: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert GUID.match(body["trace_id"])
    assert GUID.match(body["correlation_id"])
    assert re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z$", body["timestamp"])


def whoami(sandbox: Any, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return session(sandbox.ca_path).get(
        f"{sandbox.d365_url}/api/data/v9.2/WhoAmI", headers=headers, timeout=30
    )


def test_msal_acquires_a_token_over_tls_with_only_the_connection_values(sandbox: Any) -> None:
    app = msal_app(sandbox)
    result = app.acquire_token_for_client(scopes=[f"{sandbox.d365_url}/.default"])
    assert result["token_type"] == "Bearer"
    assert result["token_source"] == "identity_provider"
    assert result["expires_in"] > 3000
    response = whoami(sandbox, result["access_token"])
    assert response.status_code == 200
    assert GUID.match(response.json()["UserId"])
    cached = app.acquire_token_for_client(scopes=[f"{sandbox.d365_url}/.default"])
    assert cached["token_source"] == "cache"
    assert cached["access_token"] == result["access_token"]


def test_msal_instance_discovery_can_use_the_sandbox(sandbox: Any) -> None:
    discovery = f"{sandbox.d365_url}/common/discovery/instance"
    app = msal_app(sandbox, instance_discovery=discovery)
    result = app.acquire_token_for_client(scopes=[f"{sandbox.d365_url}/.default"])
    assert "access_token" in result, result


def test_openid_configuration_names_the_token_endpoint(sandbox: Any) -> None:
    tenant = sandbox.credentials.tenant_id
    response = session(sandbox.ca_path).get(
        f"{sandbox.d365_url}/{tenant}/v2.0/.well-known/openid-configuration", timeout=30
    )
    assert response.status_code == 200
    config = response.json()
    assert config["token_endpoint"] == f"{sandbox.d365_url}/{tenant}/oauth2/v2.0/token"
    assert config["authorization_endpoint"] == f"{sandbox.d365_url}/{tenant}/oauth2/v2.0/authorize"
    assert config["issuer"] == f"{sandbox.d365_url}/{tenant}/v2.0"


def test_the_server_certificate_is_trusted_through_the_sandbox_ca_only(sandbox: Any) -> None:
    untrusting = requests.Session()
    untrusting.trust_env = False
    with pytest.raises(requests.exceptions.SSLError):
        untrusting.get(f"{sandbox.d365_url}/api/data/v9.2/WhoAmI", timeout=30)


def test_token_success_shape(sandbox: Any) -> None:
    response = token_request(sandbox)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == body["ext_expires_in"] == 3600
    assert response.headers["Cache-Control"] == "no-store"


def test_client_secret_sent_as_http_basic_is_accepted(sandbox: Any) -> None:
    creds = sandbox.credentials
    basic = base64.b64encode(f"{creds.client_id}:{creds.client_secret}".encode()).decode()
    response = session(sandbox.ca_path).post(
        f"{sandbox.d365_url}/{creds.tenant_id}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "scope": f"{sandbox.d365_url}/.default"},
        headers={"Authorization": f"Basic {basic}"},
        timeout=30,
    )
    assert response.status_code == 200
    assert whoami(sandbox, response.json()["access_token"]).status_code == 200


def test_wrong_secret_is_invalid_client_and_never_echoed(sandbox: Any) -> None:
    response = token_request(sandbox, client_secret="not-the-secret-123")
    assert_entra_error(response, 401, "invalid_client", 7000215)
    assert "not-the-secret-123" not in response.text
    assert sandbox.credentials.client_secret not in response.text


def test_missing_secret_is_invalid_client(sandbox: Any) -> None:
    assert_entra_error(token_request(sandbox, client_secret=""), 401, "invalid_client", 7000216)


@pytest.mark.parametrize(
    ("form", "status", "error", "code"),
    [
        ({"scope": "https://other.crm.dynamics.com/.default"}, 400, "invalid_resource", 500011),
        ({"scope": "{url}/user_impersonation"}, 400, "invalid_scope", 1002012),
        ({"scope": ""}, 400, "invalid_request", 900144),
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"grant_type": ""}, 400, "invalid_request", 900144),
        ({"client_id": "00000000-0000-0000-0000-000000000000"}, 400, "unauthorized_client", 700016),
    ],
)
def test_token_request_errors(
    sandbox: Any, form: dict[str, str], status: int, error: str, code: int
) -> None:
    form = {k: v.replace("{url}", sandbox.d365_url) for k, v in form.items()}
    assert_entra_error(token_request(sandbox, **form), status, error, code)


def test_unknown_tenant_fails_discovery_and_token(sandbox: Any) -> None:
    other = "11111111-2222-3333-4444-555555555555"
    discovery = session(sandbox.ca_path).get(
        f"{sandbox.d365_url}/{other}/v2.0/.well-known/openid-configuration", timeout=30
    )
    assert_entra_error(discovery, 400, "invalid_tenant", 90002)
    assert_entra_error(token_request(sandbox, tenant=other), 400, "invalid_tenant", 90002)
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        msal_app(sandbox, authority=f"{sandbox.d365_url}/{other}")


def assert_unauthorized(response: requests.Response, code: str) -> None:
    assert response.status_code == 401
    assert response.headers["OData-Version"] == "4.0"
    assert response.headers["Content-Type"] == "application/json; odata.metadata=minimal"
    assert response.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


def test_configured_lifetime_then_expired_token_gets_401(sandbox: Any) -> None:
    sandbox.admin("d365", "PUT", "token_lifetime", json={"seconds": 1})
    app = msal_app(sandbox)
    result = app.acquire_token_for_client(scopes=[f"{sandbox.d365_url}/.default"])
    assert result["expires_in"] == 1
    token = result["access_token"]
    assert whoami(sandbox, token).status_code == 200
    time.sleep(1.2)
    assert_unauthorized(whoami(sandbox, token), "0x8004A101")


def test_expire_tokens_invalidates_every_issued_token(sandbox: Any) -> None:
    old = token_request(sandbox).json()["access_token"]
    assert whoami(sandbox, old).status_code == 200
    sandbox.admin("d365", "POST", "expire_tokens")
    assert_unauthorized(whoami(sandbox, old), "0x8004A101")
    fresh = token_request(sandbox).json()["access_token"]
    assert whoami(sandbox, fresh).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "WhoAmI"),
        ("GET", "leads"),
        ("POST", "leads"),
        ("PATCH", "leads(00000000-0000-0000-0000-000000000001)"),
        ("DELETE", "contacts(00000000-0000-0000-0000-000000000001)"),
        ("POST", "$batch"),
        ("GET", "EntityDefinitions(LogicalName='lead')"),
        ("POST", "leads/Microsoft.Dynamics.CRM.CreateMultiple"),
        ("GET", "nosuchset"),
    ],
)
def test_every_web_api_route_needs_a_valid_token(sandbox: Any, method: str, path: str) -> None:
    http = session(sandbox.ca_path)
    url = f"{sandbox.d365_url}/api/data/v9.2/{path}"
    assert_unauthorized(http.request(method, url, json={}, timeout=30), "0x8004A100")
    forged = token_request(sandbox).json()["access_token"][:-4] + "AAAA"
    response = http.request(
        method, url, json={}, headers={"Authorization": f"Bearer {forged}"}, timeout=30
    )
    assert_unauthorized(response, "0x8004A100")


def test_tokens_stay_valid_across_a_restart(sandbox: Any) -> None:
    token = token_request(sandbox).json()["access_token"]
    sandbox.restart()
    assert whoami(sandbox, token).status_code == 200


def test_certificates_are_created_once_and_reissued_for_new_hosts(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, ["127.0.0.1", "localhost"])
    ca_bytes, cert_bytes = first.ca_path.read_bytes(), first.cert_path.read_bytes()
    again = ensure_certificates(tmp_path, ["localhost", "127.0.0.1"])
    assert again.cert_path.read_bytes() == cert_bytes
    wider = ensure_certificates(tmp_path, ["127.0.0.1", "localhost", "sandbox.internal"])
    assert wider.ca_path.read_bytes() == ca_bytes
    cert = x509.load_pem_x509_certificate(wider.cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_bytes)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "sandbox.internal" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct(first.key_path.stat().st_mode & 0o777) == "0o600"
