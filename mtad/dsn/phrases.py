"""Phrase tables: which words in a remote reply mean which bounce reason (sisimai v5 names).

Pure data plus compiled matchers, each with the literals it needs (mtad.dsn.needles) so
the classifier skips reasons whose words are absent. The phrases generalise the documented replies of
the big MTAs and mailbox providers (Postfix, Exim, Sendmail, qmail, Exchange/Office 365,
Gmail/Google Workspace, Yahoo, Outlook.com, Apple, Orange, Amazon SES, ...); they are
matched case-insensitively against whitespace-folded text. Order matters: the first
reason whose phrases match wins, so narrow reasons (a block list named in a user-unknown
reply, a full mailbox reported with 5.1.1) come before broad ones.
Providers' own notices in their users' languages (German, French, Spanish, Italian,
Portuguese, Russian, Japanese, Chinese, Korean) have entries of their own beside the
English ones, so their words cost a search only when one of them occurs.
"""

from __future__ import annotations

import re

from mtad.dsn.needles import needles

# (reason, regex fragments). Fragments are plain regexes over lower-case folded text;
# keep them anchored to words and free of nested quantifiers (bounded time).
TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    # The subject/detail texts of RFC 3463 section 3, which many MTAs print verbatim
    # ("Recipient address rejected: Bad destination system address"): exact, so first.
    ("userunknown", (r"bad destination mailbox address", r"destination mailbox address ambiguous")),
    ("hostunknown", (r"bad destination system address",)),
    ("hasmoved", (r"no forwarding address",)),
    ("rejected", (r"bad sender'?s (?:mailbox|system) address", r"(?:not have|no) permission to post",
                  r"group you tried to contact")),
    ("exceedlimit", (r"message length exceeds administrative limit",)),
    ("systemfull", (r"mail system full",)),
    ("notaccept", (r"system not accepting network messages",)),
    ("mesgtoobig", (r"message too big for system",)),
    ("systemerror", (r"system incorrectly configured", r"directory server failure", r"unable to contact ldap")),
    ("contenterror", (r"(?:other or undefined )?media error", r"media not supported", r"conversion required")),
    ("mailererror", (r"\bmailer error\b", r"\bpipe to \|", r"x-unix;", r"command (?:died|failed) with status")),
    ("onhold", (r"\bon hold\b",)),
    ("spamdetected", (r"(?:due to|because of|as|for) (?:suspected )?spam\b", r"spam classification")),
    ("systemerror", (r"queue file write error",)),
    ("networkerror", (
        # Transient DNS trouble, not a missing domain (Postfix, Sendmail wordings).
        r"host not found, try again", r"malformed or unexpected name server", r"host name lookup failure",
        r"name server timeout", r"temporary (?:dns|lookup|name resolution) failure", r"dns (?:lookup )?timeout",
    )),
    ("virusdetected", (
        r"\bvirus", r"malware", r"\binfected\b", r"trojan", r"contains? (?:a )?worm",
    )),
    ("authfailure", (
        r"\bspf\b", r"\bdkim\b", r"\bdmarc\b", r"sender policy framework", r"unauthenticated",
        r"not pass authentication", r"authentication checks?", r"5\.7\.2[0-46]\b",
        r"sender (?:address|domain) (?:is )?not authenticated", r"email authentication",
    )),
    ("requireptr", (
        r"reverse dns", r"reverse (?:hostname|lookup|dns lookup)", r"\bptr\b", r"\brdns\b",
        r"cannot find your (?:reverse )?hostname", r"no (?:valid )?reverse", r"ip name lookup failed",
        r"hostname (?:does not|doesn't) (?:match|resolve)", r"reverse[- ]?resolv",
        r"unresolvable (?:host|ip|address)", r"client host rejected: cannot find",
        r"not (?:have|has) (?:a )?(?:valid )?(?:reverse|ptr)", r"dns ptr", r"5\.7\.25\b",
    )),
    ("badreputation", (
        r"(?:poor|bad|low|negative) (?:ip |sender |domain )?reputation", r"reputation (?:of|is)",
        r"4\.7\.650\b", r"5\.7\.650\b",
    )),
    # A dynamic (residential) sending address, which some providers word as "we do not relay".
    ("blocked", (r"dynamic(?:ally)?[- ]assigned ip", r"dynamic ip (?:address|range|pool|space)",)),
    ("norelaying", (
        r"relay(?:ing)? (?:access )?(?:denied|not (?:permitted|allowed)|prohibited|refused)",
        r"(?:unable|not permitted|not allowed|cannot|can't) (?:to )?relay", r"we do not relay",
        r"no relaying", r"not a gateway", r"relay not permitted", r"relaying (?:mail )?(?:to .{0,80} )?(?:is )?denied",
        r"relay access", r"open relay", r"does not relay",
    )),
    ("hasmoved", (
        r"has (?:been )?moved", r"address has changed", r"no longer (?:valid|at this address|in use|available)",
        r"user has moved", r"mailbox has moved", r"changed (?:his|her|their) (?:e-?mail )?address",
    )),
    ("mailboxfull", (
        r"mailbox (?:is )?full", r"mail ?box full", r"mailbox .{0,30}(?:has )?exceeded", r"over ?quota",
        r"quota (?:exceeded|full|violation)", r"exceeds? (?:the |its |his |her )?(?:storage |disk )?quota",
        r"(?:exceeded|reached) (?:the |its |his |her |their )?(?:storage |disk |mailbox )?(?:quota|storage)",
        r"mailbox size limit", r"user'?s? mailbox is full", r"storage (?:limit|quota|space)",
        r"disk quota", r"mail ?folder is full", r"not enough (?:storage|space) (?:in|for)", r"inbox is full",
        r"account is full", r"full mailbox", r"mailbox (?:would )?exceed", r"insufficient (?:space|storage) (?:in|for)",
        r"is over (?:its|the|his|her) (?:quota|limit|storage)", r"out of (?:mailbox )?storage",
        r"(?:message|mailbox) (?:would exceed|exceeds) .{0,40}quota", r"space (?:is )?not enough",
        r"mailbox .{0,20}(?:too large|is over)", r"user is over", r"has exceeded (?:the )?(?:maximum|max)",
        r"\bquota\b", r"mailboxfull",
    )),
    ("mailboxfull", (  # the same in other languages: searched only when their words occur
        r"postfach .{0,40}(?:voll|überschritten)", r"(?:speicherplatz|kontingent|speichergrenze) .{0,30}(?:überschritten|erschöpft)",
        r"bo[iî]te .{0,60}pleine", r"(?:quota|capacit[ée]|espace) .{0,30}(?:d[ée]pass|satur|insuffisant)",
        r"buz[oó]n .{0,30}(?:lleno|excede)", r"casella .{0,30}(?:piena|satura)",
        r"переполнен", r"превыш\w* .{0,30}(?:квот|объ[её]м|лимит)", r"квот\w* .{0,20}превыш",
        r"メールボックス.{0,20}(?:容量|いっぱい|一杯|満杯)", r"容量オーバー", r"容量超過", r"容量不足", r"容量がいっぱい",
        r"caixa .{0,30}(?:cheia|lotada)", r"邮箱已满", r"信箱已满", r"空间已满", r"空间不足", r"容量已满",
        r"용량 초과", r"용량초과", r"용량이 초과", r"용량 부족", r"용량이 부족", r"메일함.{0,10}(?:가득|꽉)",
    )),
    ("mesgtoobig", (
        r"message (?:is )?too (?:big|large)", r"message size (?:exceeds|too|limit|is over|of .{0,30} exceeds)",
        r"exceeds? (?:the )?(?:maximum |max |fixed )?(?:message )?size", r"size limit", r"(?<!header )(?<!headers )too large",
        r"message file too big", r"mail size", r"message length exceeds", r"email is too (?:big|large)",
        r"size (?:exceeds|of .{0,30} exceeds)", r"larger than (?:the )?(?:allowed|permitted|maximum)",
    )),
    ("exceedlimit", (
        r"exceeded (?:the )?(?:message |recipient )?limit", r"limit exceeded", r"too many recipients",
    )),
    ("toomanyconn", (
        r"too many (?:connections|concurrent|simultaneous|sessions|smtp sessions|messages)",
        r"rate ?limit", r"connection rate", r"try again later,? closing connection", r"sending rate", r"\bthrottl", r"exceeded the rate",
        r"too many (?:mails|emails)", r"(?:connection|message)s? (?:limit|count) exceeded", r"too fast",
        r"too many errors",
    )),
    ("notaccept", (
        r"null mx", r"(?:does not|doesn't) (?:accept|receive) (?:any )?(?:e-?)?mail",
        r"not accepting (?:any )?(?:e-?)?mail", r"accepts? no (?:e-?)?mail",
    )),
    ("hostunknown", (
        r"host (?:or domain name )?not found", r"domain (?:name )?not found", r"no such domain",
        r"unknown (?:host|domain)", r"host unknown", r"domain (?:does not|doesn't) exist",
        r"domain .{1,80} (?:does not|doesn't) exist", r"unrouteable (?:mail )?(?:address|domain)",
        r"illegal host", r"name or service not known", r"no (?:mx|mail exchanger|dns)",
        r"domain must exist", r"host \S{1,100} not found", r"(?:invalid|bad|nonexistent) domain",
        r"domain (?:is )?(?:invalid|unknown)", r"\bnxdomain\b", r"name service error",
        r"couldn't find any host", r"unable to (?:find|resolve) (?:the )?(?:host|domain|mx)",
        r"no route for", r"unroutable",
    )),
    ("hostunknown", (  # the same in other languages: searched only when their words occur
        r"domain .{0,60}existiert nicht", r"domaine .{0,60}(?:n'existe pas|inconnu|introuvable)",
        r"домен .{0,40}не (?:существует|найден)",
    )),
    ("suspend", (
        r"(?:mailbox|account|user|address|recipient)(?: has been| is| was)? (?:disabled|suspended|inactive|deactivated|frozen|locked|closed|expired)",
        r"(?:disabled|suspended|inactive|deactivated|expired|blocked|locked|closed) (?:mailbox|account|user|recipient)",
        r"(?<!delivery )temporarily (?:disabled|suspended|unavailable for|inactive)", r"not (?:an )?active",
        r"no longer active", r"account (?:has been |is )?(?:terminated|cancell?ed|blocked)",
        r"mailbox (?:is )?(?:not active|unavailable.{0,20}disabled)", r"(?<!delivery temporarily )\bsuspend",
        r"user account (?:is )?(?:disabled|expired)", r"has been disabled", r"is disabled",
    )),
    ("userunknown", (
        r"user (?:is )?unknown", r"unknown (?:user|recipient|mailbox|address|local ?part|account|alias)",
        r"no such (?:user|mailbox|recipient|account|address|person|local user|alias)",
        r"(?:user|recipient|mailbox|address|account|addressee)(?: name)? (?:not found|unknown|not known|not exist|invalid)",
        r"(?:user|recipient|mailbox|address|account|e-?mail account|e-?mail address|addressee)(?: you tried to reach)?(?: that you tried to reach)? (?:does not|doesn't|did not|does no longer|no longer) exists?",
        r"(?:invalid|bad|unknown|nonexist[ae]nt|non-exist[ae]nt|unavailable) (?:recipient|mailbox|user|address|e-?mail address|account|destination)",
        r"not a (?:valid|known) (?:user|mailbox|recipient|address)", r"no mailbox here",
        r"(?:is not|isn't) a (?:valid|known) ", r"recipient (?:address )?(?:not recogni[sz]ed|invalid|unknown)", r"not listed in (?:the )?(?:public |domino )?(?:name|address|directory)",
        r"recipient address rejected: access denied",
        r"mailbox (?:unavailable|not available|not present)", r"address (?:unknown|invalid|not found)",
        r"address rejected(?!:)",
        r"recipnotfound", r"recipientnotfound", r"user not (?:found|local|exist)", r"unknown or illegal",
        r"doesn't have an? .{1,40} account", r"does not have an? .{1,40} account", r"no such",
        r"does not exist", r"doesn't exist", r"not exist", r"undeliverable address", r"addressee unknown",
        r"\buser_unknown\b", r"no user", r"invalid (?:e-?mail )?address", r"not our customer",
        r"unknown recipient", r"account (?:not found|is unavailable)", r"mailbox (?:name )?(?:is )?invalid",
        r"bad destination", r"no (?:valid )?recipients?", r"cannot find (?:the )?(?:user|mailbox|recipient)",
    )),
    ("userunknown", (  # the same in other languages: searched only when their words occur
        r"empf[äa]nger .{0,20}unbekannt", r"unbekannte[rn]? (?:empf[äa]nger|benutzer|adresse)",
        r"benutzer .{0,20}unbekannt", r"existiert nicht", r"kein(?:en)? (?:solche[rns] )?(?:benutzer|postfach)",
        r"(?:utilisateur|destinataire|adresse) .{0,20}(?:inconnue?|inexistante?|invalide)", r"n'existe pas",
        r"usuario .{0,20}(?:desconocido|no existe)", r"utente .{0,20}(?:sconosciuto|inesistente)",
        r"не существует", r"(?:пользовател|адрес|получател|ящик)\w* .{0,30}не найден",
        r"нет такого (?:пользователя|адреса|ящика)", r"неизвестн\w* (?:пользовател|адрес|получател)",
        r"usu[aá]rio .{0,20}(?:inexistente|desconhecido)", r"n[ãa]o existe", r"no existe", r"non esiste",
        r"不存在", r"존재하지 않", r"없는 (?:사용자|주소|계정)",
        r"存在しません", r"存在しない", r"宛先不明", r"(?:ユーザー?|アカウント|アドレス).{0,10}(?:見つかりません|ありません)",
    )),
    ("rejected", (
        r"sender (?:address )?(?:was |is |has been )?(?:rejected|refused|denied|blocked|unknown|not allowed|verify failed|invalid)",
        r"(?:invalid|unknown|bad|rejected) sender", r"mail from (?:rejected|refused)",
        r"domain of sender", r"sender domain", r"sender verification", r"envelope sender",
        r"from address (?:rejected|not)", r"return[- ]path", r"sender is",
        r"(?:not|isn't|is not) (?:allowed|authorized|permitted) to send", r"unroutable sender",
    )),
    ("spamdetected", (
        r"\bspam\b", r"\bube\b", r"junk ?mail", r"unsolicited", r"\bbulk\b", r"spam(?:my| score|assassin|-?like)",
        r"detected as spam", r"(?:considered|classified|identified) as",
        r"suspicious (?:content|message)", r"content (?:looks|appears)",
    )),
    ("blocked", (
        r"black[- ]?list", r"block[- ]?list", r"deny[- ]?list", r"\brbl\b", r"dnsbl", r"spamhaus", r"spamcop",
        r"barracuda", r"sorbs", r"listed (?:in|on|at|by)", r"client host .{0,80}(?:rejected|blocked|refused)",
        r"client host rejected", r"\b(?:your|sending|source|client) (?:ip|host|server|network)\b",
        r"\bip (?:address )?\S{0,40} (?:is |has been |was )?(?:blocked|banned|listed|black-?listed|rejected|refused|not allowed)",
        r"(?:blocked|banned|refused|rejected) (?:ip|host|connection|for|due|because)(?!(?: to| of)? (?:local |our |site |the )?polic)",
        r"refused to talk",
        r"(?<!: )connection (?:refused|rejected|denied)", r"\bblocked\b", r"\bbanned\b",
        r"not allowed to (?:connect|send)", r"rejected (?:due to|because of) (?:ip|the ip)",
        r"5\.7\.6[0-4]\d\b", r"\bip\b.{0,40}\b(?:rejected|denied)", r"service (?:not available|unavailable).{0,40}(?:client|ip)",
    )),
    ("policyviolation", (
        r"polic(?:y|ies)", r"prohibited", r"not (?:allowed|permitted) by", r"violat",
        r"\bnot allowed\b", r"administrative(?:ly)? prohibit",
    )),
    ("securityerror", (
        r"authentication (?:required|failed|needed)", r"must (?:issue|authenticate|use)",
        r"(?:tls|ssl|encryption|starttls) (?:is )?required", r"\bstarttls\b", r"insecure",
        r"security", r"certificate", r"\bauth(?:entication)? (?:is )?required",
        r"not authori[sz]ed", r"unauthori[sz]ed", r"\bauthentication\b",
    )),
    ("notcompliantrfc", (
        r"\brfc ?(?:5322|2822|822|5321|2821)\b(?!;)", r"not (?:rfc[- ]?)?compliant", r"does not comply",
        r"multiple (?:from|to|subject|date|message-id|sender)", r"duplicate header", r"missing (?:a )?(?:required )?header",
        r"header (?:is )?(?:missing|malformed|invalid)", r"malformed (?:header|message|address)",
    )),
    ("contenterror", (
        r"content (?:error|rejected|not (?:allowed|accepted))", r"message content", r"invalid (?:mime|content)",
        r"\bmime\b", r"8-?bit", r"improper", r"attachment", r"character set", r"encoding",
        r"message (?:was )?(?:rejected|refused) (?:due to|because of) (?:its )?content", r"header",
    )),
    ("filtered", (
        r"filter", r"user reject", r"refused by (?:the )?recipient", r"recipient (?:has )?(?:rejected|refused|blocked)",
        r"does not accept", r"not accept(?:ing)? (?:mail|messages|e-?mail) from",
        r"delivery (?:is )?not (?:allowed|authorized)", r"not authorized to receive", r"\brule\b",
        r"受信拒否",
    )),
    ("expired", (
        r"retry (?:timeout|time) exceeded", r"(?:message|delivery) (?:has )?expired", r"\bexpired\b",
        r"(?:in|on) (?:the )?queue (?:too long|for too long|longer than)", r"too long in (?:the )?queue",
        r"could not be delivered (?:for|within) ", r"(?:unable|not able) to deliver .{0,60}(?:for|within) \d",
        r"giving up", r"gave up", r"timed? ?out", r"requests to connect", r"failing for a long time", r"maximum (?:delivery )?time", r"delivery time", r"retries exceeded",
        r"have not been able to deliver", r"delivery (?:attempts )?(?:has been |was |is )?delayed",
        r"(?:has|have) (?:been )?delayed", r"timeout exceeded", r"will (?:continue to )?(?:retry|try)",
        r"delivery attempts? (?:will )?continue", r"not (?:yet )?been delivered",
    )),
    ("mailererror", (
        r"x-unix;", r"command (?:failed|died|output)", r"procmail", r"mailer (?:error|failed)", r"exit (?:code|status)",
        r"\bpipe\b", r"local (?:delivery|mailer) (?:failed|error)", r"unix error", r"\bsh: ", r"delivery to (?:a )?(?:pipe|file) ",
    )),
    ("networkerror", (
        r"network (?:is )?unreachable", r"no route to host", r"host (?:is )?unreachable",
        r"lost connection", r"mail (?:for .{1,80} )?loops? back", r"mail loop", r"loop(?:ing)? (?:detected|count)",
        r"too many hops", r"hop count", r"routing loop", r"connection (?:reset|closed|dropped|failed|error)",
        r"could not connect", r"cannot connect", r"unable to connect", r"failed to connect",
        r"name server", r"\bdns (?:error|failure|lookup|timeout)", r"temporary (?:dns|lookup) failure",
        r"malformed or unexpected", r"unexpected (?:eof|disconnect)", r"broken pipe", r"unreachable",
    )),
    ("systemfull", (
        r"insufficient system (?:storage|resources)", r"system (?:storage )?(?:is )?full", r"disk (?:is )?full",
        r"out of disk", r"not enough (?:disk|system)", r"file system full", r"no space left",
    )),
    ("systemerror", (
        r"system error", r"internal (?:server )?error", r"local error", r"server error",
        r"temporary (?:failure|error|problem)", r"configuration error", r"misconfigur", r"unable to process",
        r"resources? (?:temporarily )?unavailable", r"service (?:is )?(?:not available|unavailable|temporarily)",
        r"try (?:again )?later", r"transaction failed", r"processing error", r"unexpected error",
        r"i/o error", r"(?:database|system) (?:failure|problem|busy)", r"out of memory", r"temporarily",
    )),
    ("syntaxerror", (
        r"syntax error", r"command (?:not )?unrecogni[sz]ed", r"unrecogni[sz]ed command", r"invalid command",
        r"bad sequence", r"command not (?:implemented|recognized)", r"line too long",
    )),
)


_LEADING_WORD = re.compile(r"^\\b([a-z])")


def _fast(fragment: str) -> str:
    # A leading \b stops the regex engine from skipping ahead to a literal first letter;
    # the folded text is words separated by single spaces, so "(?<![a-z])" after the
    # first letter keeps the word boundary and restores the fast scan.
    found = _LEADING_WORD.match(fragment)
    if not found:
        return fragment
    return f"{found.group(1)}(?<![a-z]{found.group(1)}){fragment[3:]}"


def _compile(table: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    out = []
    for reason, frags in table:
        if frags:
            out.append((reason, re.compile("|".join(f"(?:{_fast(f)})" for f in frags))))
    return tuple(out)


COMPILED = _compile(TABLE)

# Replies that only come out of a recipient lookup (the producer says them at RCPT or
# from its own directory, never from a content filter): userunknown even when the
# report does not show the SMTP command. Gmail, Yahoo, Outlook.com/Exchange, qmail,
# Domino, Exchange Online directory-based edge blocking, carrier MMS gateways.
DEFINITIVE_USERUNKNOWN = re.compile(
    r"account that you tried to reach does not exist|address couldn'?t be found|"
    r"delivery error: dd |requested action not taken: mailbox unavailable|"
    r"recip(?:ient)?notfound|recipient not found by smtp address lookup|recipient name is not recognized|"
    r"no mailbox here by that name|not listed in (?:the )?(?:public |domino )?(?:name|address|directory)|"
    r"recipient address rejected: access denied|no valid recipients|invalid recipient|"
    r"mailbox (?:does not|doesn't) exist|unknown user: <>|"
    r"existiert nicht|n'existe pas|n[ãa]o existe|no existe|non esiste|не существует|нет такого|"
    r"存在しません|宛先不明|不存在|존재하지 않"
)
REASONS = tuple(reason for reason, _ in COMPILED)


def _entry_needles(frags: tuple[str, ...]) -> tuple[str, ...] | None:
    found: list[str] = []
    for fragment in frags:
        need = needles(_fast(fragment))
        if need is None:
            return None
        found.extend(need)
    return tuple(dict.fromkeys(found))


# COMPILED with, per reason, the literals one of which must occur for its pattern to
# match (see mtad.dsn.needles); None means "always search".
FILTERED: tuple[tuple[str, re.Pattern[str], tuple[str, ...] | None], ...] = tuple(
    (reason, pattern, _entry_needles(frags)) for (reason, pattern), (_, frags) in zip(COMPILED, TABLE)
)
