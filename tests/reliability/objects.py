"""Accounts, contacts on their account and opportunities, next to a Scenario's contacts.

A handful of records per direction, chosen for the cases the account and deal flows decide on
(`include/crm_sync/flows/accounts.py`, `deals.py`), so that the fault and kill matrices cover
their endpoints and their writes too:

- Dynamics 365 -> AC: an AC account already present under a Dynamics account's name (same
  company: linked, not created); one of another website (`account_name_taken`); two unlinked
  Dynamics accounts of one name (`duplicate_account`, until one is renamed in round 1); contacts
  on accounts, one of them moved between two accounts every round; opportunities open, won and
  lost, with a contact and an account, with the account only (the deal goes to its primary
  contact, or to the account alone), with a contact only, and one whose account is not linked
  (`no_deal_contact`, until round 1). Every round adds an account with a contact and an
  opportunity, changes a website and an opportunity, and closes the previous round's one.
- AC -> Dynamics 365: AC accounts matched to Dynamics accounts by name and website (one linked,
  one of another website created next to its namesake, one matching two Dynamics accounts:
  `duplicate_account` until round 1); contacts on AC accounts, one moved every round. Every round
  adds an account with a contact and changes a website.

`state(world, ...)` reads all of it back keyed by names, titles and emails, so that two worlds
built from the same rounds compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crm_sync.state import StateStore

from tests.e2e.world import World

D365_TO_AC = "dynamics365_to_activecampaign"
AC_TO_D365 = "activecampaign_to_dynamics365"
# The object endpoints each direction calls in every round: (service, path prefix, method).
READS = {
    D365_TO_AC: [
        ("d365", "/api/data/v9.2/accounts", "GET"),
        ("d365", "/api/data/v9.2/opportunities", "GET"),
        ("ac", "/api/3/accounts", "GET"),
        ("ac", "/api/3/accountContacts", "GET"),
        ("ac", "/api/3/dealGroups", "GET"),
    ],
    AC_TO_D365: [
        ("ac", "/api/3/accounts", "GET"),
        ("ac", "/api/3/accountContacts", "GET"),
        ("d365", "/api/data/v9.2/accounts", "GET"),
    ],
}
WRITES = {
    D365_TO_AC: [
        ("ac", "/api/3/accounts", "POST"),
        ("ac", "/api/3/accounts/", "PUT"),
        ("ac", "/api/3/accountContacts", "POST"),
        ("ac", "/api/3/accountContacts/", "PUT"),
        ("ac", "/api/3/deals", "POST"),
        ("ac", "/api/3/deals/", "PUT"),
    ],
    AC_TO_D365: [
        ("d365", "/api/data/v9.2/accounts", "POST"),
        ("d365", "/api/data/v9.2/accounts(", "PATCH"),
        ("d365", "/api/data/v9.2/contacts(", "PATCH"),
    ],
}
# The creates (the writes a retry or a lost answer could repeat) and the association writes;
# each is sent at least once in every round of the direction. The kill matrix kills workers after
# the server wrote one of them, and every object row of the fault matrix hits each of them.
KILL_WRITES = {
    D365_TO_AC: [
        ("ac", "/api/3/accounts", "POST"),
        ("ac", "/api/3/accountContacts", "POST"),
        ("ac", "/api/3/deals", "POST"),
    ],
    AC_TO_D365: [
        ("d365", "/api/data/v9.2/accounts", "POST"),
        ("d365", "/api/data/v9.2/contacts(", "PATCH"),
    ],
}


def _bind(entity_set: str, row_id: str) -> str:
    return f"/{entity_set}({row_id})"


@dataclass
class Companies:
    """The accounts, contacts on them and opportunities of one direction's scenario."""

    direction: str
    seed: int = 1
    ids: dict[str, str] = field(default_factory=dict)

    def email(self, who: str) -> str:
        return f"o{self.seed}.{who}@example.com"

    # -- both systems, as their users change them ------------------------------------------------
    def ac_account(self, world: World, label: str, name: str, url: str | None) -> str:
        account: dict[str, Any] = {"name": name}
        if url:
            account["accountUrl"] = url
        found = world._ac("POST", "accounts", json={"account": account})["account"]
        self.ids[label] = str(found["id"])
        return self.ids[label]

    def ac_person(self, world: World, who: str, account: str) -> str:
        """An AC contact queued for Dynamics as a contact, on AC account `account` (a label)."""
        contact_id = str(world.ac_contact(self.email(who), who.title(), "Objects"))
        self.ids[who] = contact_id
        world.automation([contact_id], "contact")
        body = {"accountContact": {"contact": contact_id, "account": self.ids[account]}}
        row = world._ac("POST", "accountContacts", json=body)["accountContact"]
        self.ids[f"{who}@account"] = str(row["id"])
        return contact_id

    def dv_account(self, world: World, label: str, name: str, url: str | None) -> str:
        row: dict[str, Any] = {"name": name}
        if url:
            row["websiteurl"] = url
        body = world._dv(
            "POST", "accounts", json=row, headers={"Prefer": "return=representation"}
        ).json()
        self.ids[label] = str(body["accountid"])
        return self.ids[label]

    def dv_person(self, world: World, who: str, account: str) -> str:
        """A Dynamics contact of account `account` (a label)."""
        self.ids[who] = world.dv_create(
            "contacts",
            emailaddress1=self.email(who),
            firstname=who.title(),
            lastname="Objects",
            **{"parentcustomerid_account@odata.bind": _bind("accounts", self.ids[account])},
        )
        return self.ids[who]

    def opportunity(
        self,
        world: World,
        name: str,
        *,
        customer: tuple[str, str],
        contact: str | None = None,
        account: str | None = None,
        **row: Any,
    ) -> str:
        """An opportunity; `customer`: ("account" | "contact", label)."""
        kind, label = customer
        row[f"customerid_{kind}@odata.bind"] = _bind(f"{kind}s", self.ids[label])
        if contact:
            row["parentcontactid@odata.bind"] = _bind("contacts", self.ids[contact])
        if account:
            row["parentaccountid@odata.bind"] = _bind("accounts", self.ids[account])
        created = world.sandbox.admin(
            "d365", "POST", "rows/opportunities", json={"name": name, **row}
        )
        self.ids[name] = str(created["opportunityid"])
        return self.ids[name]

    def close(self, world: World, name: str, *, won: bool) -> None:
        body = {
            "OpportunityClose": {
                "opportunityid@odata.bind": _bind("opportunities", self.ids[name])
            },
            "Status": 3 if won else 4,
        }
        action = "WinOpportunity" if won else "LoseOpportunity"
        world.sandbox.admin("d365", "POST", f"actions/{action}", json=body)

    # -- the rounds -------------------------------------------------------------------------------
    def prepare(self, world: World) -> None:
        """The first records, before the first (undisturbed) run."""
        if self.direction == D365_TO_AC:
            self._prepare_dv(world)
        else:
            self._prepare_ac(world)

    def change(self, world: World, round_no: int) -> None:
        """One round of changes the next run of the direction moves."""
        if self.direction == D365_TO_AC:
            self._change_dv(world, round_no)
        else:
            self._change_ac(world, round_no)

    def _prepare_dv(self, world: World) -> None:
        # Already in AC: the same company (linked by name and domain), and another one.
        self.ac_account(world, "ac globex", "Globex", "globex.example")
        self.ac_account(world, "ac umbrella", "Umbrella", "umbrella.example")
        self.dv_account(world, "acme", "Acme Corp", "https://www.acme.example")
        self.dv_account(world, "globex", "Globex", "https://www.Globex.example/about")
        self.dv_account(world, "umbrella", "Umbrella", "https://umbrella.co.uk")
        self.dv_account(world, "initech", "Initech", "initech.example")
        self.dv_account(world, "initech twin", "Initech", "initech.de")
        self.dv_person(world, "ada", "acme")
        self.dv_person(world, "bob", "acme")
        self.dv_person(world, "cy", "globex")
        world.dv_update(
            "accounts",
            self.ids["acme"],
            **{"primarycontactid@odata.bind": _bind("contacts", self.ids["ada"])},
        )
        self.opportunity(
            world, "Acme renewal", customer=("account", "acme"), contact="ada", account="acme",
            estimatedvalue=12000.5, salesstage=1,
        )  # fmt: skip
        # The account only: the deal goes to the account's primary contact.
        self.opportunity(world, "Acme support", customer=("account", "acme"), estimatedvalue=300)
        # The account only, no primary contact: a deal of the account alone; won.
        self.opportunity(world, "Globex expansion", customer=("account", "globex"), estimatedvalue=50000)  # fmt: skip
        self.close(world, "Globex expansion", won=True)
        # A contact only; lost.
        self.opportunity(world, "Pilot for Bob", customer=("contact", "bob"), estimatedvalue=999.99)
        self.close(world, "Pilot for Bob", won=False)
        # Its account is quarantined (two of one name): waits as no_deal_contact.
        self.opportunity(world, "Initech audit", customer=("account", "initech"), estimatedvalue=7)

    def _change_dv(self, world: World, round_no: int) -> None:
        r = round_no
        self.dv_account(world, f"r{r}", f"Company R{r}", f"https://r{r}.example")
        self.dv_person(world, f"p{r}", f"r{r}")
        self.opportunity(
            world, f"Deal R{r}", customer=("account", f"r{r}"), contact=f"p{r}", account=f"r{r}",
            estimatedvalue=1000 * (r + 1) + 0.25, salesstage=r % 4,
        )  # fmt: skip
        world.dv_update("accounts", self.ids["acme"], websiteurl=f"https://www.acme.example/r{r}")
        # Bob moves between Acme and Globex.
        to = "globex" if r % 2 == 0 else "acme"
        world.dv_update(
            "contacts",
            self.ids["bob"],
            **{"parentcustomerid_account@odata.bind": _bind("accounts", self.ids[to])},
        )
        world.sandbox.admin(
            "d365", "PATCH", f"rows/opportunities/{self.ids['Acme renewal']}",
            json={"estimatedvalue": 12000.5 + r, "salesstage": (r + 2) % 4},
        )  # fmt: skip
        if r >= 1:
            self.close(world, f"Deal R{r - 1}", won=r % 2 == 1)
        if r == 1:
            # Renamed: both Initech accounts leave the quarantine, and the audit gets its deal.
            world.dv_update("accounts", self.ids["initech twin"], name="Initech Europe")

    def _prepare_ac(self, world: World) -> None:
        # Already in Dynamics: the same company; another of the same name; two of one name.
        self.dv_account(world, "dv globex", "Globex", "https://www.globex.example")
        self.dv_account(world, "dv umbrella", "Umbrella", "https://umbrella.co.uk")
        self.dv_account(world, "dv initech", "Initech", None)
        self.dv_account(world, "dv initech twin", "Initech", "https://initech.example")
        self.ac_account(world, "acme", "Acme Corp", "acme.example")
        self.ac_account(world, "globex", "Globex", "globex.example")
        self.ac_account(world, "umbrella", "Umbrella", "umbrella.example")
        self.ac_account(world, "initech", "Initech", "initech.example")
        self.ac_person(world, "ada", "acme")
        self.ac_person(world, "bob", "acme")
        self.ac_person(world, "cy", "globex")

    def _change_ac(self, world: World, round_no: int) -> None:
        r = round_no
        self.ac_account(world, f"r{r}", f"Company R{r}", f"r{r}.example")
        self.ac_person(world, f"p{r}", f"r{r}")
        world._ac(
            "PUT",
            f"accounts/{self.ids['acme']}",
            json={"account": {"accountUrl": f"https://acme.example/r{r}"}},
        )
        # Bob moves between Globex and Acme (and changes, so that the run reads him).
        to = "globex" if r % 2 == 0 else "acme"
        world._ac(
            "PUT",
            f"accountContacts/{self.ids['bob@account']}",
            json={"accountContact": {"account": self.ids[to]}},
        )
        world.ac_update(self.ids["bob"], firstName=f"Bob R{r}")
        if r == 1:
            # Given its own website: one Initech of Dynamics is left to match.
            world.dv_update("accounts", self.ids["dv initech"], websiteurl="https://initech.de")


# -- reading it back ------------------------------------------------------------------------------
def _all(world: World, path: str, key: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        page = world._ac("GET", path, params={"limit": 100, "offset": len(rows)})[key]
        rows += page
        if len(page) < 100:
            return rows


def _sorted(value: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(value.items()))


@dataclass
class ObjectState:
    """The objects of both systems and their links, keyed by names, titles and emails."""

    parts: dict[str, Any]
    # record keys of the quarantine (`account:<id>`...) -> a key that compares across worlds
    labels: dict[str, str]
    duplicates: list[str]


def state(
    world: World, store: StateStore, ac_email: dict[str, str], dv_email: dict[str, str]
) -> ObjectState:
    """AC accounts (name, url), accountContacts, pipelines, deals (title, value, stage, status,
    contact, account), Dynamics accounts and the contacts' accounts, and the object links."""
    parts: dict[str, Any] = {}

    def add(part: str, key: str, row: Any) -> None:
        name = f"{part}[{key}]"
        parts[name] = tuple(sorted((*parts.get(name, ()), row), key=repr))

    accounts = {str(a["id"]): a for a in _all(world, "accounts", "accounts")}
    ac_name = {i: str(a["name"]) for i, a in accounts.items()}
    for account in accounts.values():
        add("ac account", str(account["name"]), account.get("accountUrl") or "")
    for row in _all(world, "accountContacts", "accountContacts"):
        who = ac_email.get(str(row["contact"]), f"ac contact {row['contact']}")
        add("ac account contact", who, ac_name.get(str(row["account"]), "?"))
    stage_rows = _all(world, "dealStages", "dealStages")
    stages = {str(s["id"]): str(s["title"]) for s in stage_rows}
    groups = {str(g["id"]): str(g["title"]) for g in _all(world, "dealGroups", "dealGroups")}
    for group_id, title in groups.items():
        titles = sorted(str(s["title"]) for s in stage_rows if str(s["group"]) == group_id)
        add("ac pipeline", title, tuple(titles))
    deal_title: dict[str, str] = {}
    for deal in _all(world, "deals", "deals"):
        deal_title[str(deal["id"])] = str(deal["title"])
        account = deal.get("account") or deal.get("organization")
        add(
            "ac deal",
            str(deal["title"]),
            (
                int(deal["value"]),
                deal.get("currency"),
                groups.get(str(deal["group"]), "?"),
                stages.get(str(deal["stage"]), "?"),
                int(deal["status"]),
                str(deal.get("owner")),
                ac_email.get(str(deal.get("contact")), "") if deal.get("contact") else "",
                ac_name.get(str(account), "?") if account else "",
                deal.get("description") or "",
            ),
        )
    dv_label: dict[str, str] = {}
    for account in world.dv_rows("accounts"):
        label = f"{account['name']} <{account.get('websiteurl') or ''}>"
        dv_label[str(account["accountid"])] = label
        add("dv account", label, str(account.get("statecode")))
    for contact in world.dv_rows("contacts"):
        parent = contact.get("_parentcustomerid_value")
        if parent:
            key = dv_email.get(str(contact["contactid"]), str(contact["contactid"]))
            add("dv contact account", key, dv_label.get(str(parent), "?"))
    opportunity = {str(o["opportunityid"]): str(o["name"]) for o in world.dv_rows("opportunities")}

    for link in store.object_links("account"):
        add(
            "link account",
            dv_label.get(link.dataverse_id, link.dataverse_id),
            (ac_name.get(link.ac_id, "?"), link.origin, _sorted(link.synced_values)),
        )
    for link in store.object_links("opportunity"):
        synced = dict(link.synced_values)
        if synced.get("contact"):
            synced["contact"] = ac_email.get(str(synced["contact"]), "?")
        if synced.get("account"):
            synced["account"] = ac_name.get(str(synced["account"]), "?")
        add(
            "link opportunity",
            opportunity.get(link.dataverse_id, link.dataverse_id),
            (deal_title.get(link.ac_id, "?"), link.origin, _sorted(synced)),
        )
    for link in store.object_links("account_contact"):
        synced = dict(link.synced_values)
        if synced.get("account"):
            synced["account"] = ac_name.get(str(synced["account"]), "?")
        add(
            "link account_contact",
            dv_email.get(link.dataverse_id, link.dataverse_id),
            (ac_email.get(link.ac_id, "?"), link.origin, _sorted(synced)),
        )
    labels = {f"account:{i}": f"account:{n}" for i, n in dv_label.items()}
    labels |= {f"ac_account:{i}": f"ac_account:{n}" for i, n in ac_name.items()}
    labels |= {f"opportunity:{i}": f"opportunity:{n}" for i, n in opportunity.items()}
    # Two rows where one is expected: an AC account name, a Dynamics account (name and website),
    # a deal title, a pipeline, a contact on two accounts, or two links of one record.
    duplicates = sorted(k for k, rows in parts.items() if len(rows) > 1)
    return ObjectState(parts, labels, duplicates)
