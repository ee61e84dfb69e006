"""Generate the demo's support datasets for Quillstack, a fictional team knowledge-base product.

Rows are composed from per-topic templates and small vocabularies, so the facts stay consistent
(a plan always costs the same, an error code always means the same thing) and a tiny model has
something learnable. The output is deterministic: running this script again rewrites the same
bytes (tests/support/test_support.py checks that the shipped files are what it writes). Run from anywhere:

    python tests/support/make_support_dataset.py [OUT_DIR]

It writes, into the CLI package's data folder (cli/kubetune_cli/data/, which ships in the wheel for
`kubetune demo`) unless OUT_DIR is given:
  support-instructions.jsonl  {"prompt", "response"} rows for training
  support-eval.jsonl          held-out {"prompt", "response"} rows (no prompt also in training)
  support-chat.jsonl          {"messages": [...]} conversations, some with a system message, some multi-turn
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20260514
N_INSTRUCTIONS = 300
N_EVAL = 30
N_CHAT = 100
MAX_RESPONSE_WORDS = 120
DATA = Path(__file__).resolve().parents[2] / "cli" / "kubetune_cli" / "data"

PRODUCT = "Quillstack"

PLANS = {
    "Starter": {"price": "free", "seats": "up to 5 members", "storage": "2 GB", "rate": "120"},
    "Team": {
        "price": "$8 per member per month",
        "seats": "up to 50 members",
        "storage": "100 GB",
        "rate": "600",
    },
    "Business": {
        "price": "$15 per member per month",
        "seats": "up to 500 members",
        "storage": "1 TB",
        "rate": "3000",
    },
    "Enterprise": {
        "price": "$25 per member per month, billed yearly",
        "seats": "unlimited members",
        "storage": "10 TB",
        "rate": "10000",
    },
}
ERRORS = {
    "QS-401": (
        "your session has expired",
        "sign out, sign back in, and if you use SSO make sure your identity provider session is still active",
    ),
    "QS-403": (
        "your role does not allow that action in this space",
        "ask a space admin to give you the Editor role, or to move the page to a space you can edit",
    ),
    "QS-409": (
        "two devices changed the same page while one was offline",
        "open the page, pick the version to keep in the conflict banner, and the other version stays in page history",
    ),
    "QS-429": (
        "the API token sent too many requests",
        "slow down, respect the Retry-After header, and batch writes where you can",
    ),
    "QS-507": (
        "the workspace has used all of its storage",
        "delete old attachments from Settings > Storage, or upgrade to a plan with more storage",
    ),
}
SYSTEMS = [
    "Windows 11",
    "macOS 14",
    "macOS 15",
    "Ubuntu 22.04",
    "Ubuntu 24.04",
    "Fedora 40",
    "an iPad",
    "Android",
]
INTEGRATIONS = {
    "Slack": "posts page updates to a channel you choose",
    "GitHub": "links pull requests to pages and shows their status inline",
    "Jira": "embeds issues in pages and keeps their status up to date",
    "Google Drive": "lets you embed Docs and Sheets that stay in sync",
    "Zapier": "triggers workflows when pages are created or updated",
}
REGIONS = {"eu-west": "Frankfurt", "us-east": "Virginia", "ap-south": "Mumbai"}
EXPORT_FORMATS = ["Markdown", "HTML", "PDF", "JSON"]
ROLES = ["Viewer", "Commenter", "Editor", "Space admin", "Workspace owner"]
TEAMS = ["marketing", "engineering", "support", "finance", "design", "sales", "operations", "legal"]
SIZES = ["3", "12", "25", "40", "80", "150", "300"]

# Openers and closers vary the length and tone of prompts and answers without changing their content.
PROMPT_OPENERS = [
    "",
    "",
    "",
    "Hi, ",
    "Hello, quick question: ",
    "Hey team, ",
    "I'm the admin for our {team} team of {size} people. ",
    "We've been using {product} for about a year and love it, but ",
    "Sorry if this has been asked before. ",
    "Our {team} team is rolling {product} out next week and I'm preparing the onboarding notes. ",
    "I searched the help center and couldn't find a clear answer. ",
]
RESPONSE_CLOSERS = [
    "",
    "",
    "",
    " Let us know if anything is unclear.",
    " If that doesn't help, reply with your workspace name and we'll take a look.",
    " You can find more detail in the help center under the same topic.",
    " Happy to help further if you run into anything else.",
]
SYSTEM_PROMPTS = [
    f"You are the {PRODUCT} support assistant. Answer briefly and accurately.",
    f"You help customers of {PRODUCT}, a team knowledge base. Be friendly and give concrete steps.",
    f"You are a support engineer for {PRODUCT}. If you are not sure, say so and suggest contacting support.",
    "Answer in plain language. Use numbered steps when there is more than one action.",
]


# Shared by every topic: a short follow-up turn for conversations.
THANKS_FOLLOW_UPS = [
    ("Thanks, that worked!", "Glad to hear it. If anything else comes up, just ask."),
    ("Great, thank you.", "You're welcome. Have a good day!"),
    ("Perfect, that's what I needed.", "Happy to help. Reply here any time if something else comes up."),
]


@dataclass(frozen=True)
class Topic:
    """One kind of question: (prompt, response) template pairs, and follow-ups for conversations.

    A prompt template may appear in several pairs, to give it more than one good answer.
    """

    pairs: list[tuple[str, str]]
    follow_ups: list[tuple[str, str]] = field(default_factory=list)


TOPICS: dict[str, Topic] = {
    "plan_price": Topic(
        pairs=[
            ("How much does the {plan} plan cost?", "The {plan} plan is {price} and covers {seats}."),
            (
                "What is the price of {product} {plan}, per member?",
                "{plan} costs {price}. It includes {seats} and {storage} of storage for the whole workspace.",
            ),
            (
                "Can you tell me what we would pay on the {plan} plan, and how many members it allows?",
                "On {plan} you pay {price}, and the plan allows {seats}.",
            ),
            (
                "We're comparing tools. What does {plan} include in terms of price, members, storage and API limits?",
                "On {plan} you pay {price}. The plan allows {seats}, comes with {storage} of storage, and "
                "each API token can make {rate} requests per minute. Every plan includes unlimited pages, "
                "page history and the desktop and mobile apps.",
            ),
        ],
        follow_ups=[
            (
                "Can we switch plans later?",
                "Yes. You can upgrade or downgrade at any time from Settings > Billing. Upgrades apply "
                "right away; downgrades take effect at the end of the current billing period.",
            ),
            (
                "Is there a discount for paying yearly?",
                "Yes, annual billing on Team and Business costs the same as ten months of monthly billing.",
            ),
        ],
    ),
    "error_code": Topic(
        pairs=[
            ("What does error {code} mean?", "{code} means {meaning}. To fix it, {fix}."),
            (
                "I keep getting {code} in the desktop app on {system}. What should I do?",
                "That error, {code}, appears when {meaning}. Your pages are not lost. To resolve it, {fix}.",
            ),
            (
                "The sync icon turned red and shows {code}. Is my data safe?",
                "Yes, your data is safe: edits are kept on your device until they sync. Error {code} tells "
                "you that {meaning}. The quickest fix: {fix}. If it keeps happening, send us the log file "
                "from Help > Export logs so we can look at the timeline.",
            ),
            (
                "One of my colleagues sees {code} whenever she opens a page in the {team} space. How do we fix it?",
                "{code} means {meaning}. To fix it, {fix}. If she still sees the error afterwards, ask her "
                "to export the logs from Help > Export logs and attach them to a ticket with the page name "
                "and the time it happened. Meanwhile she can open the page in the web app, which uses a "
                "separate session.",
            ),
            ("Got the error {code}, what is it?", "{code}: {meaning}. To fix it, {fix}."),
        ],
        follow_ups=[
            (
                "Where do I find the log file?",
                "In the desktop app open Help > Export logs. It saves a zip file to your Downloads folder; "
                "attach it to your support ticket.",
            ),
            (
                "It happened again after that. Anything else I can try?",
                "Please sign out, quit the app completely, clear the local cache from Settings > Advanced, "
                "and sign in again. If the error comes back, send us the log file and we will investigate.",
            ),
        ],
    ),
    "install": Topic(
        pairs=[
            (
                "How do I install the desktop app on {system}?",
                "Download the installer for {system} from the Downloads page, run it, and sign in with your "
                "work email. Your spaces start syncing right after sign-in.",
            ),
            (
                "Is there a {product} app for {system}?",
                "Yes, there is an app for {system}. Get it from the Downloads page and sign in with your "
                "work email or SSO.",
            ),
            (
                "What are the steps to set up {product} on a new {system} machine for a member of the {team} team?",
                "To set up {product} on {system}: 1. Open the Downloads page and pick {system}. 2. Run the "
                "installer. 3. Sign in with a work email or SSO. 4. Choose which spaces to keep available "
                "offline. The first sync can take a few minutes for large spaces, and the app shows its "
                "progress in the status bar.",
            ),
        ],
        follow_ups=[
            (
                "Does it work offline?",
                "Yes. Spaces you mark as available offline can be read and edited without a connection; "
                "changes sync when you are back online.",
            ),
        ],
    ),
    "password": Topic(
        pairs=[
            (
                "I forgot my password, what do I do?",
                "Open the sign-in page, choose Forgot password, and enter your work email. The reset link "
                "is valid for 30 minutes.",
            ),
            (
                "How do I reset my password?",
                "On the sign-in page choose Forgot password and enter your work email. We send a reset link "
                "that is valid for 30 minutes.",
            ),
            (
                "I never received the password reset email. What now?",
                "Reset emails usually arrive within a minute. Check the spam folder and make sure the "
                "address matches the one your admin invited. If your workspace uses SSO, there is no "
                "{product} password: reset it with your identity provider instead.",
            ),
            (
                "A new hire on our {team} team cannot log in and says the reset link has expired. Can you help?",
                "Reset links expire after 30 minutes, so they should request a new one from the sign-in "
                "page and use it straight away. If the email does not arrive within five minutes, check the "
                "spam folder and confirm the address matches the invitation. An admin can also resend the "
                "invitation from Settings > Members.",
            ),
        ],
    ),
    "sso": Topic(
        pairs=[
            (
                "Does {product} support single sign-on?",
                "Yes. SAML single sign-on is available on the Business and Enterprise plans, and SCIM "
                "provisioning is included on Enterprise.",
            ),
            (
                "How do we set up SAML SSO with Okta?",
                "On Business or Enterprise, open Settings > Security > Single sign-on, copy the ACS URL and "
                "entity ID into a new Okta SAML app, upload the Okta metadata file back into {product}, "
                "test with one account, then turn on Enforce SSO.",
            ),
            (
                "Which plan do we need for SSO and automatic user provisioning with SCIM?",
                "SAML SSO needs the Business plan or higher. SCIM provisioning, which creates and removes "
                "members automatically from your identity provider, is part of Enterprise.",
            ),
            (
                "Our security team requires SSO for every tool, and we have {size} people. Is that possible "
                "on {product}, and what would it take to enforce it?",
                "Yes. SSO works with Okta, Microsoft Entra ID, Google Workspace and any SAML 2.0 provider, "
                "on the Business and Enterprise plans. The usual rollout: 1. Configure the SAML app in your "
                "provider with the ACS URL and entity ID from Settings > Security > Single sign-on. 2. "
                "Upload the provider's metadata. 3. Test with a few accounts while passwords still work. 4. "
                "Tell your {size} members the date, then turn on Enforce SSO. After that, everyone signs in "
                "through the provider and passwords stop working. Workspace owners keep a recovery login in "
                "case the provider is unavailable. If you also want accounts created and removed "
                "automatically, SCIM provisioning comes with Enterprise.",
            ),
        ],
        follow_ups=[
            (
                "What happens to people who already have passwords?",
                "Once SSO is enforced, existing members must sign in through your identity provider; their "
                "passwords stop working. Workspace owners keep a recovery login in case the provider is "
                "down.",
            ),
        ],
    ),
    "export": Topic(
        pairs=[
            (
                "Can I export a space to {fmt}?",
                "Yes. Open the space, choose Space settings > Export, and pick {fmt}. Attachments are "
                "included in the zip file.",
            ),
            (
                "How do I export all our pages at once?",
                "A workspace owner can export everything from Settings > Data > Export workspace. Pick a "
                "format such as Markdown or HTML; you get an email with a download link when it is ready.",
            ),
            (
                "We are archiving the {team} space. What's the best way to export it as {fmt} and keep the "
                "attachments?",
                "Open the {team} space, choose Space settings > Export, pick {fmt}, and leave Include "
                "attachments switched on. Large exports are prepared in the background; you get an email "
                "with a download link that is valid for seven days. After downloading, you can archive the "
                "space from the same menu so it becomes read-only.",
            ),
            (
                "Is there a command line way to export pages as {fmt}?",
                "Yes. Install the CLI, run quill login, then run quill export --space NAME --format "
                "{fmt_lower}. It writes a zip file to the current directory.",
            ),
        ],
    ),
    "rate_limit": Topic(
        pairs=[
            (
                "What are the API rate limits on {plan}?",
                "Each API token on {plan} can make {rate} requests per minute. When you go over, the API "
                "answers 429 with a Retry-After header.",
            ),
            (
                "Our integration gets QS-429 errors. What is the request limit on the {plan} plan?",
                "On the {plan} plan the limit is {rate} requests per minute per token. When you get QS-429, "
                "wait for the number of seconds in the Retry-After header before trying again.",
            ),
            (
                "We plan to sync about {size} thousand pages a day through the API on {plan}. Will we hit "
                "the rate limit, and how should the client back off?",
                "On {plan} each token can make {rate} requests per minute, which is plenty for {size} "
                "thousand pages a day if the work is spread out. Use the batch endpoint to update up to 100 "
                "pages per request, avoid bursts at the top of the hour, and when you receive a 429, wait "
                "for the number of seconds in Retry-After before retrying. Exponential backoff with jitter "
                "works well for anything that is not a 429.",
            ),
        ],
    ),
    "integration": Topic(
        pairs=[
            (
                "Do you integrate with {integration}?",
                "Yes. The {integration} integration {integration_does}.",
            ),
            (
                "How do I connect {integration} to our workspace?",
                "A workspace admin connects it once from Settings > Integrations > {integration} and "
                "approves the permissions. After that, members with the Editor role can use it in their "
                "spaces.",
            ),
            (
                "What does the {integration} integration actually do?",
                "The {integration} integration {integration_does}. It is available on every plan.",
            ),
            (
                "The {team} team wants {integration} connected to {product}. Do they need an admin to set it up?",
                "Yes, the first connection needs a workspace admin: open Settings > Integrations > "
                "{integration} and approve it. After that, anyone in the {team} team with the Editor role "
                "can use it. The {integration} integration {integration_does}.",
            ),
        ],
    ),
    "permissions": Topic(
        pairs=[
            (
                "What can someone with the {role} role do?",
                "{role_does} Roles are set per space, so a person can have different roles in different spaces.",
            ),
            (
                "What's the difference between the roles in a space?",
                "Roles, from least to most access: Viewer reads pages, Commenter can also comment, Editor "
                "can create and edit pages, Space admin manages members of a space, and the Workspace owner "
                "manages billing and security.",
            ),
            (
                "How do I give someone the {role} role in the {team} space?",
                "Open the {team} space, choose Members, find the person, and pick {role} from the role "
                "menu. The change applies immediately; they may need to refresh the page.",
            ),
        ],
    ),
    "data_region": Topic(
        pairs=[
            (
                "Where is our workspace data stored?",
                "{product} runs in three regions: eu-west in Frankfurt, us-east in Virginia and ap-south in "
                "Mumbai. You choose the region when the workspace is created.",
            ),
            (
                "Can we keep our workspace data in {region_name}?",
                "Yes. Choose the {region} region, hosted in {region_name}, when you create the workspace. "
                "Pages, attachments and backups then stay there.",
            ),
            (
                "For compliance we need to know which data center region holds our pages and backups. Can "
                "we choose {region}?",
                "Yes. The {region} region is hosted in {region_name}. Pages, attachments and backups of a "
                "workspace stay in its region. Moving an existing workspace to another region is possible "
                "on Enterprise; contact support to schedule it.",
            ),
        ],
    ),
    "outage": Topic(
        pairs=[
            (
                "Is {product} down right now?",
                "You can check live status and past incidents at status.quillstack.example. Subscribe there "
                "to get an email or Slack message when an incident starts and ends.",
            ),
            (
                "Pages are loading very slowly for everyone in the {team} team right now. Is there an incident?",
                "Thanks for reporting it. Please check status.quillstack.example for any open incident. If "
                "nothing is listed, send us your workspace name, region and the time it started, and we "
                "will investigate.",
            ),
            (
                "Where can I check the service status?",
                "Live status and the full incident history are always at status.quillstack.example.",
            ),
        ],
    ),
    "cancel": Topic(
        pairs=[
            (
                "How do I cancel my subscription?",
                "A workspace owner can cancel from Settings > Billing > Cancel plan. The workspace stays "
                "active until the end of the paid period and then moves to the free Starter plan.",
            ),
            (
                "We want to cancel the {paid_plan} plan at the end of this month. What happens to our data?",
                "Your workspace keeps working until the end of the billing period. After that it moves to "
                "Starter: your pages stay readable, but spaces above the Starter limits become read-only. "
                "Nothing is deleted, and you can export everything at any time.",
            ),
            (
                "Can I get a refund if I cancel?",
                "Monthly plans are not refunded, but they keep working until the end of the paid month. "
                "Annual plans cancelled within 14 days of renewal are refunded in full.",
            ),
        ],
    ),
}
ROLE_DOES = {
    "Viewer": "A Viewer can read pages and search, but cannot comment or edit.",
    "Commenter": "A Commenter can read pages and add comments, but cannot edit them.",
    "Editor": "An Editor can create, edit, move and delete pages, and use integrations in the space.",
    "Space admin": "A Space admin can do everything an Editor can, and also manages the space's members and settings.",
    "Workspace owner": "A Workspace owner manages billing, security, SSO and every space in the workspace.",
}


def fill(template: str, values: dict[str, str]) -> str:
    return template.format(**values)


def sentence_inside(text: str) -> str:
    """Lower-case a sentence's first letter to follow "Hi, " or "but ", keeping "I" and codes like "
    ""QS-409"."""
    first_word = text.split(" ", 1)[0]
    if first_word in {"I", "I'm"} or not first_word[1:2].islower():
        return text
    return text[0].lower() + text[1:]


def values_for(rng: random.Random) -> dict[str, str]:
    """One consistent set of slot values: a plan with its own price, an error code with its own meaning."""
    plan = rng.choice(list(PLANS))
    code = rng.choice(list(ERRORS))
    integration = rng.choice(list(INTEGRATIONS))
    region = rng.choice(list(REGIONS))
    fmt = rng.choice(EXPORT_FORMATS)
    meaning, fix = ERRORS[code]
    role = rng.choice(ROLES)
    return {
        "product": PRODUCT,
        "plan": plan,
        "paid_plan": rng.choice([name for name in PLANS if name != "Starter"]),
        **PLANS[plan],
        "code": code,
        "meaning": meaning,
        "fix": fix,
        "system": rng.choice(SYSTEMS),
        "integration": integration,
        "integration_does": INTEGRATIONS[integration],
        "region": region,
        "region_name": REGIONS[region],
        "fmt": fmt,
        "fmt_lower": fmt.lower(),
        "role": role,
        "role_does": ROLE_DOES[role],
        "team": rng.choice(TEAMS),
        "size": rng.choice(SIZES),
    }


def compose_pair(rng: random.Random) -> tuple[str, str, Topic]:
    topic = TOPICS[rng.choice(sorted(TOPICS))]
    values = values_for(rng)
    opener = fill(rng.choice(PROMPT_OPENERS), values)
    prompt_template, response_template = rng.choice(topic.pairs)
    prompt = fill(prompt_template, values)
    if opener:
        prompt = opener + (prompt if opener.endswith(". ") else sentence_inside(prompt))
    response = fill(response_template, values)
    closer = rng.choice(RESPONSE_CLOSERS)
    if len((response + closer).split()) <= MAX_RESPONSE_WORDS:
        response += closer
    return prompt, response, topic


def instruction_rows(rng: random.Random, count: int) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < count:
        prompt, response, _ = compose_pair(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "response": response})
    return rows


def chat_rows(rng: random.Random, count: int) -> list[dict[str, list[dict[str, str]]]]:
    rows = []
    for _ in range(count):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        prompt, response, topic = compose_pair(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if rng.random() < 0.35:
            question, answer = rng.choice(topic.follow_ups + THANKS_FOLLOW_UPS)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if (question, answer) not in THANKS_FOLLOW_UPS and rng.random() < 0.6:
                question, answer = rng.choice(THANKS_FOLLOW_UPS)
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out_dir: Path = DATA) -> None:
    rng = random.Random(SEED)
    pairs = instruction_rows(rng, N_INSTRUCTIONS + N_EVAL)
    # Unique prompts, so the held-out rows never appear verbatim in training.
    write_jsonl(out_dir / "support-instructions.jsonl", pairs[:N_INSTRUCTIONS])
    write_jsonl(out_dir / "support-eval.jsonl", pairs[N_INSTRUCTIONS:])
    write_jsonl(out_dir / "support-chat.jsonl", chat_rows(rng, N_CHAT))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)
