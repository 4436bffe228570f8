"""Grounding by construction for the researcher (DESIGN.md): untrusted page text in, checked facts out.

Pipeline: ``split_sentences`` cuts each fetched document into sentences, ``is_instruction`` drops
sentences aimed at an AI (prompt injection: they are data, never followed, and can never become
evidence), ``number_sentences`` numbers the rest ``S1..Sn`` across documents under a prompt budget,
and ``ground_facts`` keeps a model's fact only when its evidence resolves to a numbered sentence (or
a verbatim quote of a fetched document) that contains the value, the source is attributed to the
prospect's company and the value has its field's shape; other facts are dropped and counted by reason.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agents.attribution import CompanyMatcher
from agents.fact_shapes import value_problem
from agents.prompts import render_sentences
from agents.schemas import DROP_REASONS, FACT_FIELDS, ExtractedFact, ExtractionOutput, Fact
from core.tasks import ExtractionTask
from core.tasks import Sentence as TaskSentence
from tools.textnorm import normalize_page_text
from tools.types import Document

__all__ = [
    "INSTRUCTION_PATTERNS",
    "MAX_FACT_VALUE_CHARS",
    "NumberedSentences",
    "Sentence",
    "check_fact",
    "contains_normalized",
    "ground_facts",
    "host_of",
    "is_instruction",
    "normalize",
    "number_sentences",
    "split_sentences",
]

logger = logging.getLogger(__name__)

#: Longest fact value kept (characters).
MAX_FACT_VALUE_CHARS = 120
#: Sentences longer than this are cut at a word boundary (the cut text is still a verbatim quote).
_MAX_SENTENCE_CHARS = 400
#: Shortest verbatim quote accepted as evidence when the model cites text instead of an id.
_MIN_QUOTE_CHARS = 8

_TRANSLATE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                            "\u2014": "-", "\u00a0": " "})
_WS = re.compile(r"\s+")
_LINE = re.compile(r"\r\n|\r|\n")
# Split after ., ! or ? (optionally followed by a closing quote/bracket) when whitespace and an
# upper-case letter, digit or opening quote follow: "2.0" and "example.com" stay whole.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+(?=[A-Z0-9\"'\u201c\u2018(\[])"
)

# Building blocks of INSTRUCTION_PATTERNS. Each is a tuple of alternatives that start with a letter,
# so ``_INSTRUCTION`` can skip a pattern with one character test where its first letter cannot match.
_AI_NOUNS: tuple[str, ...] = (
    r"ai(?:[- ](?:assistant|assistent|asistente|assistente|agent|agente|model|modell|modele|modelo|modello|system|"
    r"systeme|sistema|bot|chatbot|crawler|reader|tool|summari[sz]er)\w*|s)?",
    r"a\.i\.", r"ia(?:[- ](?:assistant|agent|modele|modelo|modello|sistema|systeme)\w*)?",
    r"ki(?:[- ](?:assistent|agent|modell|system|bot|chatbot|crawler|tool)\w*)?",
    r"llms?", r"gpt\w*", "genai", "chatgpt", "claude", "gemini", "copilot", r"large language models?",
    r"language models?", r"sprachmodell\w*", r"modeles? de langage", r"modelos? de (?:lenguaje|linguagem)",
    r"modell[oi] linguistic[oi]", r"taalmodel\w*", r"chat ?bots?", r"bots?",
    r"assist\w*(?: (?:d'|de |di )?(?:ia|ki|ai))?",
    r"asistentes?(?: de ia)?", r"agent\w* (?:d'|de |di )?(?:ia|ki|ai)", r"modele\w* (?:d'|de )?ia", r"crawlers?",
    r"scrapers?", r"summari[sz]ers?", r"robots?",
    r"automat\w* \w+", r"geautomatiseerde? \w+",
)
_AI_STRICT: tuple[str, ...] = (
    r"ai[- ](?:assistant|assistent|asistente|assistente|agent|agente|model|modell|modele|modelo|modello|system|"
    r"systeme|sistema|bot|chatbot|crawler|reader|tool|summari[sz]er)\w*",
    r"ia[- ](?:assistant|agent|modele|modelo|modello|sistema|systeme)\w*",
    r"ki[- ](?:assistent|agent|modell|system|bot|chatbot|crawler|tool)\w*",
    r"llms?", "chatgpt", r"large language models?", r"language models?", r"sprachmodell\w*",
    r"modeles? de langage", r"modelos? de (?:lenguaje|linguagem)", r"modell[oi] linguistic[oi]", r"taalmodel\w*",
    r"chat ?bots?", "bots", r"crawlers?", r"scrapers?", r"summari[sz]ers?",
    r"assist\w* (?:d'|de |di )?(?:ia|ki|ai)", r"asist\w* (?:de )?ia", r"agent\w* (?:d'|de |di )?(?:ia|ki|ai)",
    r"automat\w* (?:readers?|assistants?|agents?|tools?|systems?|models?|programs?|services?|summari[sz]ers?|"
    r"lecteurs?|systemes?|outils?|systeme|sistemas?|herramientas?|strumenti|ferramentas?)",
    r"geautomatiseerde? (?:lezers?|assistenten|agenten|systemen|modellen|programma's)",
)
_OVERRIDE: tuple[str, ...] = (
    "ignore", "ignoring", "forget", "override", "bypass", "disregard", "discard", "skip", "ignorez", "ignorer",
    "oubliez", "oublie", "oublier", r"ne tenez (?:pas|plus) compte", r"ignorier\w*", r"uberspring\w*", "vergiss",
    "vergessen sie", r"missachte\w*", r"ignora\w*", "ignoren", r"olvid[ae]\w*", "omite", "omita", "haz caso omiso",
    "no hagas caso", r"dimentica\w*", r"esquec\w*", "desconsidere", "negeer", "vergeet",
)
_SAY_VERBS = (
    r"(?:state|say|mention|include|insert|add|write|tell|link|recommend|praise|promote|describe|treat|ignore|forget|"
    r"disregard|output|print|use|call|claim|put|append|begin|start|note|mentionner|inclure|ecrire|dire|indiquer|"
    r"citer|ajouter|recommander|erwahnen|nennen|schreiben|sagen|angeben|einfugen|empfehlen|mencionar|incluir|"
    r"escribir|decir|citar|agregar|recomendar|menzionare|includere|scrivere|citare|raccomandare|escrever|dizer|"
    r"vermelden|noemen|schrijven|zeggen|opnemen|aanbevelen)\b"
)
_THIS_PAGE = (
    r"(?:this|these|the|our|cette|ce|cet|ces|diese[rsnm]?|esta|este|estas|estos|questa|questo|deze|dit)\s"
    r"(?:page|site|website|webpage|web page|text|document|article|content|post|profile|listing|entry|description|"
    r"seite|webseite|inhalt|dokument|beitrag|texte|contenu|pagina|sitio|sito|texto|testo|documento|contenido|"
    r"contenuto|conteudo|tekst)s?\b"
)
_READING = (
    r"(?:reading|processing|visiting|crawling|scraping|summari[sz]ing|analy[sz]ing|parsing|indexing|ingesting|"
    r"viewing|lisant|traitant|analysant|resumant|lisent|traitent|resument|lesen|liest|verarbeite\w*|"
    r"zusammenfass\w*|analysier\w*|lee[ns]?|lean?|procesa\w*|resum\w*|legg\w*|elabor\w*|riassum\w*|le(?:e|em|m)?|"
    r"processa\w*|lendo|lees|lezen|leest|verwerk\w*|samenvat\w*)\b"
)
_YOU = (
    r"(?:you|your|vous|tu|du|usted|voce|je|jij|must|should|devez|dois|doit|debes|debe|deves|deve|devi|musst|mussen|"
    r"sollst|solltest|moet|please|veuillez|bitte|por favor|per favore)\b"
)
#: After an addressee noun: the noun phrase ends there ("If you are an AI," but not "an AI startup").
_ROLE_END = (
    r"(?=\s*(?:[,.;:!?)]|$|\b(?:and|or|reading|processing|summari[sz]ing|visiting|crawling|scraping|parsing|that|who|"
    r"which|tasked|asked|instructed|you|lisant|qui|que|der|die|das|che|dat)\b))"
)
_AI = "(?:" + "|".join(_AI_NOUNS) + ")"

#: ``(context, anchors, rest)``: the pattern ``context + \b(?:anchor|...) + rest``. ``context`` is zero-width.
_INSTRUCTION_PARTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # Override commands: "ignore all previous instructions" and its translations.
    ("", _OVERRIDE, r"\b.{0,60}\b(?:instructions?|prompts?|directives?|consignes?|indications|anweisung\w*|"
     r"instruktion\w*|befehle|instrucciones|instruccion|indicaciones|ordenes|istruzioni|indicazioni|direttive|"
     r"instrucoes|instrucao|orientacoes|instructies|aanwijzingen|opdrachten)\b"),
    ("", _OVERRIDE, r"\b (?:\w+ ){0,2}?(?:previous|prior|above|earlier|preceding|original|initial|system|your|my|"
     r"these|those|all|any|precedentes|anterieures|vorherigen|bisherigen|obigen|anteriores|precedenti|vorige)\b"
     r".{0,20}\b(?:rules|guidelines|guidance|directions|commands|regles|regeln|vorgaben|richtlinien|reglas|"
     r"directrices|regole|regras|diretrizes|regels|richtlijnen)\b"),
    ("", ("disregard",), r"\b"),
    # "forget everything you were told", "ignore what the rest of the page says", and translations.
    ("", ("ignore", "forget", "disregard", "discard", "override", "skip", "drop"),
     r"\b (?:\w+ ){0,2}?(?:everything|anything|all|what(?:ever)?)\b (?:\S+ ){0,5}?(?:told|said|says|given|"
     r"instructed|above|before|previously|earlier|prior)\b"),
    ("", ("oubliez", "oublie", "ignorez", "ignore"),
     r" (?:tout|tous|toutes)\b.{0,30}\b(?:dit|donne\w*|precede\w*|ci-dessus|avant)\b"),
    ("", ("vergiss", "vergessen sie", "ignoriere", "ignorieren sie"),
     r"\b,? (?:alles|was)\b.{0,40}\b(?:gesagt|vorher|zuvor|bisher|oben)\b"),
    ("", ("ignora", "olvida", "olvide", "ignore", "dimentica"),
     r"\w* (?:todo|lo|tutto|quanto)\b.{0,20}\b(?:anterior|dicho|previo|arriba|precedente|sopra|detto|prima)\b"),
    ("", ("ignore", "esqueca", "desconsidere", "negeer", "vergeet"),
     r" (?:tudo|o que|alles|wat)\b.{0,30}\b(?:anterior|dito|acima|antes|eerder|gezegd|hierboven|voorgaande)\b"),
    ("", ("instead of", "rather than", "without"), r" (?:following|obeying|using|heeding) (?:your|the|any|all)\b "
     r"(?:\w+ ){0,2}?(?:instructions|guidance|rules|guidelines|prompt|directions)\b"),
    # An AI addressee told what to do: "Language models must state ...", "Bots: please insert ...".
    ("", _AI_STRICT, r"\b[^.]{0,60}?(?:\b(?:must|should|shall|need to|needs to|have to|has to|are (?:asked|"
     r"instructed|required|expected|supposed) to|is (?:asked|instructed|required|expected|supposed) to|take note|"
     r"please|doivent|doit|devez|mussen|muss|sollen|soll|sollten|deben|debe|devono|deve|devem|moeten|moet|bitte|"
     rf"veuillez)\b|:)\s*(?:\S+ ){{0,6}}?{_SAY_VERBS}"),
    ("", ("whoever", "anyone", r"assistants?", r"agents?", r"models?", r"writers?", r"tools?", r"systems?", r"bots?"),
     r"\b (?:who |that |which )?(?:is |are )?(?:writing|drafting|composing|generating|preparing) "
     r"(?:this|the|an?|your|any) (?:e-?mails?|messages?|reply|replies|response|summary|outreach|pitch)\b"),
    ("", ("tell", "inform", "remind"), r" (?:everyone|anyone|all those|whoever|everybody) (?:who|that) "
     r"(?:reads|receives|sees|opens)\b"),
    ("", ("when",), r" (?:generating|drafting|composing|writing|preparing) (?:\w+ ){0,2}?(?:outreach|e-?mails?|"
     r"summar(?:y|ies)|messages?|replies|responses?|pitch(?:es)?|profiles?)\b.{0,60}?\b(?:include|mention|say|"
     r"state|add|insert|link|tell|always|never)\b"),
    # Addressing an AI: "Note to AI assistants:", "Attention LLMs,", "Dear ChatGPT,", "Hinweis an die KI".
    ("", ("note", "message", "memo", "notice", "attention", "hinweis", "achtung", "nachricht", "nota", "aviso",
          "atencion", "attenzione", "avviso", "bericht", "let op"),
     r"\b[ :,]+(?:(?:to|for|a|aux?|pour|an|fur|para|per|ai|agli|alla|voor|aan)\b ?)?(?:(?:the|all|any|every|les|la|"
     rf"le|die|den|der|alle|jede[nrs]?|los|las|el|i|gli|os|as|de|het)\b ?|l')?{_AI}\b"),
    ("", ("dear", "hey", "hi", "hello", "bonjour", "cher", "chere", "hallo", r"liebe[rs]?", "hola", r"querid[oa]",
          "ciao", r"car[oa]", "ola", "beste"), rf" {_AI}\s*[,:!]"),
    # "As an AI, you ...", "En tant qu'IA, vous devez", "Als KI-Assistent musst du", "Como IA, debes".
    ("", ("as", r"en tant que?", "als", "como", "come", "enquanto"),
     rf"\s*(?:an?|une?|ein(?:e|en)?|una?|uma?|een)?\s*'?\s*{_AI}\b,?\s*{_YOU}"),
    # "If you are an AI model, ...", "Si vous êtes une IA", "Wenn du eine KI bist", "Se sei un'IA".
    ("", ("if", "when", "since", "because"), rf" (?:you(?: are|'re)|you happen to be) (?:an? |the )?{_AI}{_ROLE_END}"),
    ("", ("si",), rf" (?:vous etes|tu es|eres|es usted|usted es) (?:une? |una? )?{_AI}{_ROLE_END}"),
    ("", ("wenn", "falls", "sofern"), rf" (?:du|sie) (?:ein(?:e|en)? )?{_AI} (?:bist|sind)\b"),
    ("", ("se",), rf" (?:sei|lei e|voce e|voce for|tu es|fores) (?:un'|una? |uma? )?{_AI}{_ROLE_END}"),
    ("", ("als", "indien"), rf" (?:je|jij|u) (?:een )?{_AI} (?:bent|is)\b"),
    ("", ("if", "when", "while"), r" (?:this|the) (?:\w+ )?(?:is|are) (?:being )?(?:read|processed|summari[sz]ed|"
     rf"parsed|crawled|scraped|analy[sz]ed|ingested|indexed|seen) by (?:an? |the |any )?{_AI}"),
    ("", ("you",), r"(?: are|'re) (?:a|an) (?:helpful|friendly|harmless|honest|obedient)\b (?:\w+ )?(?:assistant|"
     r"model|chatbot|bot|agent|ai)\b"),
    ("", ("you",), rf"(?: are|'re) (?:a|an) (?:ai|llm|(?:large )?language model|chatbot){_ROLE_END}"),
    # "AI agents reading this page must ...", "KI-Systeme, die diese Seite lesen".
    ("", _AI_NOUNS, rf"\b.{{0,40}}\b{_READING}.{{0,12}}{_THIS_PAGE}"),
    ("", _AI_NOUNS, rf"\b.{{0,40}}{_THIS_PAGE} (?:lesen|liest|verarbeiten|verarbeitet|zusammenfassen|zusammenfasst|"
     r"analysieren|analysiert|crawlen|leest|lezen|verwerkt|verwerken)\b"),
    # Indirect: "whoever summarises this page should", "any automated reader processing this".
    ("", ("whoever",), r"\b.{0,30}\b(?:summari|read|process|writ|describ|report|cover|review|analy)\w*"),
    ("", ("anyone", "anybody", "everyone", "those"), r"\b (?:who |that |which )?(?:is |are )?(?:summari[sz]\w*|"
     rf"process\w*|crawl\w*|scrap\w*|pars\w*|index\w*|ingest\w*|analy[sz]\w*) {_THIS_PAGE}"),
    ("", ("any", "every", "each", "all"), r"\b (?:(?:automated|automatic|ai|machine|software|external)\s)?(?:tools?|"
     r"systems?|programs?|software|models?|readers?|assistants?|agents?|bots?|crawlers?|scrapers?|services?|"
     r"summari[sz]ers?)\b (?:that |which |who )?(?:is |are )?(?:(?:reading|parsing|crawling|summari[sz]ing|"
     r"visiting|scraping|ingesting|indexing)\b|(?:process\w*|analy[sz]\w*|read[s]?) (?:this|these)\b)"),
    ("", ("any",), r" (?:automated|automatic|ai|machine) (?:readers?|assistants?|agents?|tools?|systems?|models?|"
     r"programs?)\b"),
    ("", ("quiconque", "celui qui", "celle qui", "ceux qui", "toute personne qui",
          r"tout (?:outil|systeme|programme|assistant|modele) qui"),
     r"\b.{0,20}\b(?:resume|resumera|traite|lit|analyse|synthetise)\w*"),
    ("", ("wer", r"jeder,? der", r"jedes (?:tool|system|programm),? das"), r"\b (?:diese\w*|den|die|das) (?:seite|"
     r"text|inhalt|webseite|website|beitrag|artikel)\w* (?:zusammenfass|verarbeit|lies|liest|les|analys|crawl)\w*"),
    ("", ("quien", "quienquiera que", "cualquiera que", r"todo (?:sistema|programa|asistente|modelo) que", "chiunque",
          "quem quer que", r"qualquer (?:sistema|programa|assistente|modelo) que", "iedereen die",
          r"elk (?:systeem|programma|model) dat"),
     r"\b (?:resuma|lea|procese|analice|resume|lee|procesa|analiza|riassum\w*|legg\w*|elabor\w*|analizz\w*|"
     r"resum\w*|le|ler|process\w*|analis\w*|deze|dit)\b"),
    # "When you write about us, say ...", "Quand vous écrivez sur nous, dites ...".
    ("", (r"when(?:ever)?", "if", "while", "before", "once"), r"\b (?:you(?:'re| are)? )?(?:summari[sz]\w*|"
     r"describ\w*|writ\w* (?:about|up)|talk\w* about|report\w* (?:on|about)|present\w*|refer\w* to|introduc\w*|"
     r"pitch\w*|mention\w*|cover\w*|review\w*|email\w*)\b.{0,60}?\b(?:say|state|claim|write|mention|call|describe|"
     r"tell|include|emphasi[sz]e|highlight|refer|always|never|make sure|be sure|remember|you (?:should|must|need to|"
     r"have to|will|shall))\b"),
    ("", ("quand", "lorsque", "si"), r" (?:vous|tu) (?:ecrivez|ecris|parlez|parles|redigez|rediges|resumez|resumes|"
     r"presentez|presentes|decrivez|decris|mentionnez|mentionnes)\b.{0,60}?\b(?:dites|dis|ecrivez|ecris|"
     r"mentionnez|mentionne|precisez|indiquez|affirmez|citez|incluez|ajoutez|toujours|n'oubliez pas|veuillez)\b"),
    ("", ("wenn", "sobald", "falls"), r" (?:du|sie)\b.{0,40}\b(?:schreibst|schreiben|berichtest|berichten|"
     r"zusammenfasst|zusammenfassen|beschreibst|beschreiben|erwahnst|erwahnen)\b.{0,60}?\b(?:sag|sage|sagen sie|"
     r"schreib|schreibe|schreiben sie|erwahne|erwahnen sie|nenne|nennen sie|betone|betonen sie|immer|stets|musst|"
     r"mussen|sollst|sollten)\b"),
    ("", ("cuando", "si", "quando", "se"), r" (?:escribas|escriba|hables|hable|resumas|resuma|describas|describa|"
     r"menciones|mencione|redactes|redacte|scrivi|scrive|parli|parla|riassumi|riassume|descrivi|descrive|menzioni|"
     r"escrever|falar|resumir|descrever|mencionar|voce escrever)\b.{0,60}?\b(?:di|diga|decir|escribe|escriba|"
     r"menciona|mencione|afirma|afirme|incluye|incluya|siempre|debes|debe|di'|dite|dica|scrivi|scriva|afferma|"
     r"includi|sempre|devi|deve|escreva|inclua)\b"),
    ("", ("wanneer", "als"), r" (?:je|u) (?:over ons )?(?:schrijft|praat|samenvat|beschrijft)\b.{0,60}?\b(?:zeg|"
     r"schrijf|vermeld|noem|altijd|moet)\b"),
    # Telling the readers: "tell the reader", "dites aux lecteurs", "sagen Sie den Lesern", "di a los lectores".
    ("", ("tell", "inform", "remind", "assure", "warn"), r" (?:the |your |all |our )?(?:readers?|recipients?|"
     r"prospects?)\b"),
    ("", ("tell", "inform", "assure", "warn"), r" (?:the |your |all |our )?users? that\b"),
    ("", ("dites", "dis", "dire", "indiquez", "annoncez", "expliquez", "informez", "rappelez", "assurez", "precisez",
          "signalez", "ecrivez"), r"\b(?:-| )?(?:aux?|les|a vos|a tes|a nos|a leurs?|vos)? ?(?:lecteurs?|"
     r"lectrices?|utilisateurs?|utilisatrices?|destinataires?|internautes|prospects?)\b"),
    ("", ("sag", "sage", "sagt", "sagen sie", "teile", "teilt", "teilen sie", "erzahl", "erzahle", "erzahlen sie",
          "informiere", "informieren sie", "erinnere", "erinnern sie", "versichere", "versichern sie", "schreib",
          "schreibe", "schreiben sie"), r"\b (?:dem|den|allen|deinen|ihren|jedem)? ?(?:leser\w*|nutzer\w*|"
     r"benutzer\w*|empfanger\w*|interessent\w*)\b"),
    ("", ("dem", "den", "allen", "deinen", "ihren"), r" (?:leser\w*|nutzer\w*|empfanger\w*) (?:\w+ )?(?:sagen|"
     r"mitteilen|erzahlen|schreiben)\b"),
    ("", ("di", "dile", "diles", "diga", "digale", "digales", "decir", "informa", "informe", "informales", "recuerda",
          "recuerde", "cuenta", "cuentale", "cuentales", "asegura", "asegure", "escribe", "digam", "diz", "informem",
          "lembre", "avise", "conte", "escreva"), r"\b (?:a |aos |as |ao |para (?:os|as) )?(?:los |las |tus |sus |"
     r"todos los |seus |suas )?(?:lectores|lectoras|usuarios|usuarias|destinatarios|prospectos|leitores|leitoras|"
     r"utilizadores)\b"),
    ("", ("di'", "di", "dite", "dica", "informa", "informate", "ricorda", "ricordate", "assicura", "scrivi"),
     r" (?:ai|alle|agli) (?:tuoi |suoi )?(?:lettori|lettrici|utenti|destinatari)\b"),
    ("", ("vertel", "zeg", "meld", "informeer", "herinner"), r"\b (?:het |de |alle |je |uw )?(?:lezers|gebruikers|"
     r"ontvangers)\b"),
    # Second person aimed at the summariser or the writer.
    ("", ("you",), r" (?:must|should|shall|need to|have to|are (?:required|instructed|asked|expected|supposed) to)"
     r"(?: now| always| also| only)? (?:say|write|tell|include|mention|recommend|add|insert|state|claim|describe|"
     r"call|refer|praise|promote|link|direct|urge|output|print|reveal|repeat|respond|reply|answer|summari[sz]e|"
     r"ignore|forget)\b"),
    ("", ("you",), r" (?:must|are) now\b"),
    ("", ("vous devez", "tu dois", "il faut que vous"), r"\b (?:maintenant |desormais |toujours |aussi |egalement )?"
     r"(?:dire|ecrire|mentionner|inclure|recommander|ajouter|affirmer|preciser|ignorer|oublier|repondre|citer|"
     r"inserer|rediger)\b"),
    ("", ("du musst", "du sollst", "du solltest", "sie mussen", "sie sollen", "sie sollten"),
     r"\b (?:\S+ ){0,5}?(?:sagen|schreiben|erwahnen|empfehlen|einfugen|hinzufugen|behaupten|ignorieren|vergessen|"
     r"antworten|nennen|betonen)\b"),
    ("", ("debes", "tienes que", "deberias", "devi", "dovete", "dovresti", "voce deve", "voce precisa", "deves",
          "voce tem que"), r"\b (?:ahora |siempre |tambien |ora |sempre |anche |agora |tambem )?(?:decir|escribir|"
     r"mencionar|incluir|recomendar|anadir|agregar|afirmar|ignorar|olvidar|responder|insertar|dire|scrivere|"
     r"menzionare|includere|raccomandare|aggiungere|affermare|ignorare|dimenticare|rispondere|inserire|dizer|"
     r"escrever|adicionar|esquecer)\b"),
    ("", ("je moet", "u moet", "jij moet"), r"\b (?:\w+ ){0,3}?(?:zeggen|schrijven|vermelden|noemen|aanbevelen|"
     r"toevoegen|negeren|vergeten|antwoorden)\b"),
    ("", ("your", "every", "each"), r" (?:summary|summaries|reply|replies|response|responses|answer|answers|output|"
     r"write-?up)\b (?:\w+ ){0,3}?(?:must|should|shall|has to|have to|needs? to|is to|are to)\b"),
    ("", ("votre", "ta", "chaque", "deine", "ihre", "jede", "tu", "su", "cada", "la tua", "ogni", "sua", "je", "elk"),
     r" (?:resume|reponse|synthese|antwort|zusammenfassung|respuesta|resumen|risposta|sintesi|resposta|sintese|"
     r"antwoord|samenvatting)\b.{0,20}\b(?:doi[st]|muss|debe|deve|moet)\b"),
    ("", ("in", "into"), r" (?:your|every|each) (?:reply|replies|response|responses|answer|answers|output|summary|"
     r"summaries|write-?up)\b"),
    ("", ("dans", "in", "en", "nella", "na"), r" (?:votre|ta|ton|chaque|deiner|ihrer|jeder|tu|cada|tua|sua|je) "
     r"(?:reponse|resume|synthese|antwort|zusammenfassung|respuesta|resumen|risposta|sintesi|resposta|sintese|"
     r"antwoord|samenvatting)\b"),
    (r"(?:^|(?<=[.!:;] ))", ("respond", "reply", "answer"), r"(?: only)? with\b"),
    ("", ("please", "always", "only", "just", "now"), r" (?:respond|reply|answer)(?: only)? with\b"),
    (r"(?:^|(?<=[.:;!,] ))", ("describe", "present", "portray", r"characteri[sz]e", "call", "refer to", "rank", "rate",
                              "recommend", "list", "introduce", "position"), r" (?:us|this (?:company|business|"
     r"firm|vendor|product|startup)|the company|our (?:company|product|business|team)) as\b"),
    ("", ("please", "always", "be sure to", "make sure to", "you should", "you must"), r" (?:describe|present|"
     r"portray|characteri[sz]e|call|refer to|rank|rate|recommend|list|introduce|position) (?:us|this (?:company|"
     r"business|firm|vendor|product|startup)|the company|our (?:company|product|business|team)) as\b"),
    ("", ("presentez-nous", "decrivez-nous", "presente-nous", "decris-nous", "qualifiez-nous", "beschreibe uns",
          "beschreiben sie uns", "stelle uns", "stellen sie uns", "nenne uns", "nennen sie uns", "describenos",
          "presentanos", "descrivici", "presentaci", "descreva-nos", "apresente-nos", "beschrijf ons",
          "presenteer ons", "noem ons"), r" (?:\w+ ){0,2}?(?:comme|als|como|come)\b"),
    (r"(?:^|(?<=[.:;!] ))", ("say", "write", "state", "claim", "mention", "report", "respond", "reply", "answer"),
     r" that\b"),
    ("", ("please", "and", "then"), r" (?:say|write|state|claim|mention|report|respond|reply|answer) that\b"),
    # Role changes and resets.
    ("", ("from now on", "von nun an", "a partir de maintenant", "desormais", "ab jetzt", "a partir de ahora",
          "de ahora en adelante", "d'ora in", "a partir de agora", "vanaf nu"),
     r"\b(?:(?<=from now on)|(?<=von nun an)|,? (?:vous|tu|vous devez|tu dois|musst du|sollst du|bist du|wirst du|"
     r"debes|eres|tienes que|(?:poi|avanti),? (?:devi|sei)|voce deve|voce e|deves|moet je|ben je|moet u|bent u)\b)"),
    ("", ("you are now", "vous etes maintenant", "vous etes desormais", "ahora eres", "ora sei", "agora voce e",
          "je bent nu"), r"\b"),
    ("", ("du bist",), r" (?:jetzt|nun) (?:ein|eine|der|die)\b"),
    ("", (r"new instructions?", r"nouvelles? (?:instructions|consignes)", r"neue (?:anweisung|instruktion)\w*",
          "nuevas instrucciones", "nuove istruzioni", "novas instrucoes", "nieuwe instructies"), r"\b"),
    ("", ("pretend to be", "pretend you are", "pretend that you", "fais semblant", "faites semblant", r"tu so,? als",
          r"tun sie so,? als", "finge", "finja", "haz como si", "fingi", "fai finta", "faca de conta", "doe alsof"),
     r"\b"),
    ("", ("reveal", "print", "show", "output", "repeat", "ignore", "display", "leak"), r"\b.{0,20}\bsystem ?prompt\b"),
    ("", ("your",), r" system ?prompt\b"),
    (r"(?<=<\|)", ("im_start", "im_end", "system", "user", "assistant", "endoftext", "eot_id", "start_header_id",
                   "end_header_id"), r"\|>"),
    (r"(?:(?<=\[)|(?<=\[/))", ("inst",), r"\]"),
    (r"(?:(?<=<<)|(?<=<</))", ("sys",), r">>"),
    ("", ("system override", "developer mode", "god mode", "dan mode", "do anything now"), r"\b"),
    # Credential lures: "confirm your password at ...", "send their password to ...".
    ("", ("send", "confirm", "verify", "update", r"re-?enter", "enter", "reset", "validate", "submit", "share",
          "provide", "give", "email", "type"),
     r"\b (?:\w+ ){0,2}?(?:your|their|his|her|the reader's|the user's) (?:\w+ )?(?:password|passcode|credentials|"
     r"login details|login|card details|card number|bank details|account details|pin|seed phrase)s? (?:to|at|via|"
     r"here|by|on|using|through|in|within|immediately|now)\b"),
    ("", ("envoy", "confirm", "verifi", "saisi", "entr", "communiqu", "indiqu", "mett"),
     r"\w* (?:\w+ ){0,2}?(?:votre|vos|leur|leurs|ton|tes) (?:mot de passe|mots de passe|identifiants|"
     r"coordonnees bancaires|numero de carte|code pin)\b"),
    ("", ("ihr", "ihre", "dein", "deine", "ihren", "deinen"), r" (?:passwort|kennwort|zugangsdaten|kartennummer|"
     r"bankdaten|pin)\w* (?:\w+ ){0,4}?(?:senden|schicken|bestatigen|eingeben|verifizieren|aktualisieren|"
     r"mitteilen)\b"),
    ("", ("sende", "schicke", "bestatige", "gib", "senden sie", "schicken sie", "bestatigen sie", "geben sie"),
     r"\b.{0,30}\b(?:passwort|kennwort|zugangsdaten|kartennummer)\b"),
    ("", ("envi", "confirm", "verifi", "actualic", "actualiz", "introduzc", "ingres", "compart", "proporcion", "invi",
          "conferm", "aggiorn", "inserisc", "comunic", "atualiz", "insir", "digit"),
     r"\w* (?:\w+ ){0,2}?(?:tu|su|sus|tus|la tua|la sua|le tue|il tuo|il suo|a sua|sua|seu|suas|seus|a tua|tua) "
     r"(?:contrasena|clave|credenciales|datos de (?:la )?tarjeta|numero de tarjeta|password|credenziali|"
     r"numero di carta|dati della carta|senha|credenciais|numero do cartao|dados do cartao|pin)\b"),
    ("", ("stuur", "bevestig", "verifieer", "update", "voer", "geef"), r"\w* (?:\w+ ){0,2}?(?:je|uw|jouw) "
     r"(?:wachtwoord|inloggegevens|kaartnummer|pincode)\b"),
)
#: Regexes for sentences that address an AI instead of a human reader, or lure a reader's credentials,
#: in English, French, German, Spanish, Italian, Portuguese and Dutch. ``is_instruction`` matches them on
#: the sentence normalised (``normalize_page_text``, then ``normalize``) with accents removed, so they
#: are written in lower-case ASCII ("précédentes" is matched as "precedentes").
INSTRUCTION_PATTERNS: tuple[str, ...] = tuple(
    rf"{context}\b(?:{'|'.join(anchors)}){rest}" for context, anchors, rest in _INSTRUCTION_PARTS
)
def _anchor_regex(parts: tuple[tuple[str, tuple[str, ...], str], ...]) -> re.Pattern[str]:
    """A zero-width regex matching where any anchor of ``parts`` starts, anchors grouped by first letter.

    Raises:
        ValueError: an anchor does not start with a lower-case letter that stands on its own (not
            followed by a quantifier).
    """
    by_letter: dict[str, set[str]] = {}
    for _context, anchors, _rest in parts:
        for anchor in anchors:
            if not ("a" <= anchor[:1] <= "z") or anchor[1:2] in ("?", "*", "+", "{"):
                raise ValueError(f"instruction anchor {anchor!r} must start with a lower-case letter of its own")
            by_letter.setdefault(anchor[0], set()).add(anchor[1:])
    return re.compile(r"\b(?=" + "|".join(f"{c}(?:{'|'.join(sorted(a))})" for c, a in sorted(by_letter.items())) + ")")


# ``is_instruction`` finds the places where an anchor starts with one pass of ``_INSTRUCTION_ANCHOR``
# (anchors grouped by first letter, so each place costs a few character tests) and tries
# ``_INSTRUCTION`` only there; each pattern of it is skipped unless the place can start one of its anchors.
_INSTRUCTION_ANCHOR = _anchor_regex(_INSTRUCTION_PARTS)
_INSTRUCTION = re.compile("|".join(
    f"(?=[{''.join(sorted({a[0] for a in anchors}))}]){pattern}"
    for (_, anchors, _), pattern in zip(_INSTRUCTION_PARTS, INSTRUCTION_PATTERNS, strict=True)
))

# Words and shapes that make a sentence likely to state one of the profile fields.
_FACT_CUE = re.compile(
    r"\d|\b(?:founded|established|since|started|based|headquarter\w*|HQ|located|offices?|employ\w*|team|"
    r"staff|people|customers?|clients?|serve[sd]?|built for|trusted|flagship|product|platform|meet|"
    r"announced|launched|raised|opened|hired|expanded|acquired|news|struggle\w*|challenge\w*|focus|"
    r"tackle|industry|company|startup|tags?|location|organization)\b",
    re.IGNORECASE,
)
_TABLE_CELL = re.compile(r"(?<!\\)\|")
_SENTENCE_ID = re.compile(r"^\[?\s*S\s*(\d+)\s*\]?$", re.IGNORECASE)


def normalize(text: str) -> str:
    """Return ``text`` NFKC-normalised, case-folded, with typographic quotes/dashes made plain and
    whitespace runs collapsed to one space (the comparison form of every grounding check)."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).translate(_TRANSLATE)).strip().casefold()


def contains_normalized(haystack: str, needle: str) -> bool:
    """True when ``needle`` occurs in ``haystack`` after ``normalize`` on both (empty needle: False)."""
    n = normalize(needle)
    return bool(n) and n in normalize(haystack)


def host_of(url: str) -> str:
    """Return the lower-case host of ``url`` without a leading ``www.`` or a port ('' when none).

    A bare domain such as ``acme.example`` is accepted as well as a full URL; an unparsable one (a search
    hit such as ``http://[::1/x``) has no host.
    """
    if not url:
        return ""
    try:
        host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").lower()
    except ValueError:
        return ""
    return host[4:] if host.startswith("www.") else host


def split_sentences(text: str) -> list[str]:
    """Split page text into sentences with a fast regex splitter.

    Lines are split first (so markdown headings, list items, table rows and metadata lines such as
    ``"Organization foundingDate: 2012"`` each stay a sentence of their own; a table row longer than
    400 characters, usually a flattened page layout, is split into its cells), then each piece is split
    after sentence punctuation followed by whitespace and a capital letter or digit. Whitespace inside
    a sentence is collapsed to single spaces; empty pieces are dropped.

    Args:
        text: Document text (markdown plus metadata lines), any length.

    Returns:
        The sentences in page order.
    """
    out: list[str] = []
    for raw_line in _LINE.split(text):
        raw_line = raw_line.strip()
        if not raw_line:
            continue
        # A long markdown table row is usually a page layout flattened into cells: split its cells.
        long_row = raw_line.startswith("|") and len(raw_line) > _MAX_SENTENCE_CHARS
        cells = _TABLE_CELL.split(raw_line) if long_row else [raw_line]
        for piece in (p for cell in cells for p in _SENTENCE_END.split(cell.strip(" |"))):
            piece = _WS.sub(" ", piece).strip()
            if piece and any(ch.isalnum() for ch in piece):
                out.append(piece)
    return out


def is_instruction(sentence: str) -> bool:
    """True when ``sentence`` looks like an instruction aimed at an AI (see ``INSTRUCTION_PATTERNS``).

    Such sentences are prompt injection attempts in page text: the researcher never shows them to a
    model and never accepts them as evidence. The sentence may be raw or already normalised: it is
    normalised here (``normalize_page_text``, so hidden characters and look-alike letters cannot
    hide a phrase; then ``normalize``) and matched with accents removed. About 35 microseconds per
    sentence. A filter of phrases is a second line of defence only: facts are also held by their
    value shapes and by attribution.
    """
    text = normalize(normalize_page_text(sentence))
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return any(_INSTRUCTION.match(text, m.start()) for m in _INSTRUCTION_ANCHOR.finditer(text))


@dataclass(frozen=True)
class Sentence:
    """One numbered sentence: ``sid`` like ``"S12"``, its text, and the URL of its source document."""

    sid: str
    text: str
    url: str
    source_index: int


@dataclass
class NumberedSentences:
    """The sentences shown to the extraction model, grouped by source.

    Attributes:
        sentences: Numbered sentences in prompt order (``S1..Sn``).
        sources: Source URLs in prompt order (``Source 1`` is ``sources[0]``); sources without a
            selected sentence are left out.
        dropped_instructions: Sentences dropped because they looked like instructions to an AI.
        omitted: Sentences left out to respect the prompt budget.
    """

    sentences: list[Sentence] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    dropped_instructions: int = 0
    omitted: int = 0

    def __post_init__(self) -> None:
        self._by_id = {s.sid.upper(): s for s in self.sentences}

    def get(self, sid: str) -> Sentence | None:
        """Return the sentence with id ``sid`` (``"S12"``, case-insensitive), or None."""
        return self._by_id.get(sid.strip().upper())

    def task_sentences(self) -> tuple[TaskSentence, ...]:
        """The sentences as an extraction task holds them (``core.tasks.Sentence``), in prompt order."""
        return tuple(TaskSentence(id=s.sid, text=s.text, source_url=s.url) for s in self.sentences)

    def format(self) -> str:
        """Render the sentences as the extraction prompt shows them (``agents.prompts.render_sentences``):
        ``Source k: <url>`` then ``S<i>: <text>`` lines, sources separated by a blank line;
        ``"(no sentences)"`` when empty."""
        return render_sentences(self.task_sentences())

    @classmethod
    def from_task(cls, task: ExtractionTask) -> NumberedSentences:
        """The numbered sentences of an extraction task (e.g. a stored trace's), sources numbered from 1 by
        runs of consecutive sentences of one page, as the prompt shows them."""
        sentences: list[Sentence] = []
        sources: list[str] = []
        url: str | None = None
        for s in task.sentences:
            if s.source_url != url or not sources:
                url = s.source_url
                sources.append(url)
            sentences.append(Sentence(s.id, s.text, s.source_url, len(sources)))
        return cls(sentences, sources)


def _cut(sentence: str) -> str:
    if len(sentence) <= _MAX_SENTENCE_CHARS:
        return sentence
    cut = sentence[:_MAX_SENTENCE_CHARS]
    space = cut.rfind(" ")
    return cut[:space] if space > _MAX_SENTENCE_CHARS // 2 else cut


def number_sentences(
    documents: Sequence[Document],
    *,
    own_host: str = "",
    max_sentences: int = 150,
    max_chars: int = 24_000,
) -> NumberedSentences:
    """Split, filter and number the sentences of ``documents`` for the extraction prompt.

    Duplicate sentences (navigation, footers) are kept once; instruction-like sentences are dropped
    and counted. When the budget is exceeded, sentences from ``own_host`` and sentences with fact
    cues (digits, "founded", "based in", ...) are kept first; the kept ones are then numbered in
    document order.

    Args:
        documents: Fetched documents, best source first.
        own_host: Host of the prospect's website (as ``host_of`` returns it), or '' when unknown.
        max_sentences: Most sentences in the prompt (> 0).
        max_chars: Most characters of sentence text in the prompt (> 0).

    Returns:
        The numbered sentences.

    Raises:
        ValueError: ``max_sentences`` or ``max_chars`` is not positive.
    """
    if max_sentences <= 0 or max_chars <= 0:
        raise ValueError(f"max_sentences ({max_sentences}) and max_chars ({max_chars}) must be positive")
    seen: set[str] = set()
    candidates: list[tuple[tuple[bool, bool, int, int], int, int, str, str]] = []
    dropped = 0
    for d_idx, doc in enumerate(documents):
        own = bool(own_host) and host_of(doc.url) == own_host
        # Corpora stored before normalisation existed hold raw text: normalise again (idempotent).
        for pos, raw in enumerate(split_sentences(normalize_page_text(doc.text))):
            if is_instruction(raw):
                dropped += 1
                continue
            text = _cut(raw)
            key = normalize(text)
            if key in seen:
                continue
            seen.add(key)
            cue = _FACT_CUE.search(text) is not None
            candidates.append(((not own, not cue, d_idx, pos), d_idx, pos, text, doc.url))
    chosen: list[tuple[int, int, str, str]] = []
    used = 0
    for _prio, d_idx, pos, text, url in sorted(candidates, key=lambda c: c[0]):
        if len(chosen) >= max_sentences:
            break
        if used + len(text) > max_chars:
            continue
        used += len(text)
        chosen.append((d_idx, pos, text, url))
    chosen.sort()
    sentences: list[Sentence] = []
    sources: list[str] = []
    last_doc = -1
    for d_idx, _pos, text, url in chosen:
        if d_idx != last_doc:
            sources.append(url)
            last_doc = d_idx
        sentences.append(Sentence(f"S{len(sentences) + 1}", text, url, len(sources)))
    if dropped:
        logger.info("dropped %d instruction-like sentence(s) from %d document(s)", dropped, len(documents))
    return NumberedSentences(sentences, sources, dropped, len(candidates) - len(chosen))


def _resolve(
    evidence: str, numbered: NumberedSentences, documents: Sequence[Document]
) -> tuple[str, str] | None:
    """Return (evidence text, source URL) for a sentence id or a verbatim quote, or None."""
    ev = evidence.strip()
    m = _SENTENCE_ID.match(ev)
    if m:
        s = numbered.get(f"S{m.group(1)}")
        return (s.text, s.url) if s else None
    quote = ev.strip("\"'\u201c\u201d")
    if len(quote) < _MIN_QUOTE_CHARS or is_instruction(quote):
        return None
    needle = normalize(quote)
    for doc in documents:
        if needle in normalize(doc.text):
            return quote, doc.url
    return None


def check_fact(
    ef: ExtractedFact,
    numbered: NumberedSentences,
    documents: Sequence[Document],
    matcher: CompanyMatcher,
    taken: Set[str] = frozenset(),
) -> tuple[str, str, tuple[str, str] | None]:
    """Check one model fact the way ``ground_facts`` does (its rules 1-3, in that order).

    Args:
        ef: The fact as the model gave it.
        numbered, documents, matcher: As for ``ground_facts``.
        taken: Fields that already have a kept fact.

    Returns:
        ``(reason, detail, resolved)``: ``reason`` is '' for a kept fact (``resolved`` is then its
        ``(evidence text, source URL)``) or a key of ``DROP_REASONS`` with ``detail`` saying what is wrong
        and what to do (``resolved`` None).
    """
    field_name, value = ef.field.strip(), ef.value.strip()
    if field_name not in FACT_FIELDS:
        return "ungrounded", f"unknown field; use one of {', '.join(FACT_FIELDS)}", None
    if field_name in taken:
        return "ungrounded", "that field already has a fact; keep one per field", None
    if not value or len(value) > MAX_FACT_VALUE_CHARS:
        return "ungrounded", f"the value is empty or longer than {MAX_FACT_VALUE_CHARS} characters", None
    resolved = _resolve(ef.evidence, numbered, documents)
    if resolved is None:
        last = numbered.sentences[-1].sid if numbered.sentences else "none"
        return ("ungrounded", f"the evidence must be the id of a numbered sentence (S1..{last})"
                + (" or a verbatim quote of a fetched page" if documents else ", not a quote or an unknown id"),
                None)
    sentence, url = resolved
    if not contains_normalized(sentence, value):
        return "ungrounded", f"the value does not occur in the evidence: {sentence!r}", None
    if is_instruction(sentence) or is_instruction(value):
        return "bad_value", "the evidence reads as an instruction", None
    if not matcher.attributed(url, sentence, value):
        return ("misattributed", f"{url} is not the company's site and the sentence does not name the company "
                "as its subject (outside the value, not in a list or comparison)", None)
    problem = value_problem(field_name, value, sentence, own_domain=matcher.own_domain)
    if problem:
        return "bad_value", problem, None
    return "", "", resolved


def ground_facts(
    output: ExtractionOutput,
    numbered: NumberedSentences,
    documents: Sequence[Document],
    *,
    matcher: CompanyMatcher,
) -> tuple[list[Fact], dict[str, int]]:
    """Keep the model's facts that are grounded, attributed and well-shaped; drop and count the rest.

    A fact is kept when, in this order:

    1. (else ``ungrounded``) its field is one of ``FACT_FIELDS`` and not yet taken (first wins), its
       evidence resolves (a sentence id such as ``"S12"`` of ``numbered``, or else a verbatim quote of at
       least 8 characters found in a document's text, whitespace- and case-insensitively, that does not
       look like an instruction), and its value is non-empty, at most ``MAX_FACT_VALUE_CHARS`` characters
       and occurs in the evidence;
    2. (else ``misattributed``) the source is attributed to the prospect's company: the page is on the
       company's registrable domain, or the evidence sentence names the company by name or domain, outside
       the value and not only in a list of names, a comparison or an analogy
       (``agents.attribution.CompanyMatcher.attributed``); the title or heading a sentence sits under does
       not count;
    3. (else ``bad_value``) neither the evidence nor the value reads as an instruction, and the value has
       its field's shape (``agents.fact_shapes.value_problem``).

    Reasons for drops are logged at debug level.

    Args:
        output: The parsed model answer.
        numbered: The sentences the model was shown.
        documents: The fetched documents (for quote evidence).
        matcher: The prospect's company name and website.

    Returns:
        ``(facts, drops)``: kept facts with evidence text and source URL, and the number of dropped facts
        per reason (keys of ``agents.schemas.DROP_REASONS`` with a count above zero).
    """
    facts: list[Fact] = []
    taken: set[str] = set()
    drops: Counter[str] = Counter()
    for ef in output.facts:
        reason, detail, resolved = check_fact(ef, numbered, documents, matcher, taken)
        if reason or resolved is None:
            drops[reason or "ungrounded"] += 1
            logger.debug("dropped fact %s=%r (evidence %r) as %s: %s", ef.field, ef.value, ef.evidence, reason,
                         detail)
            continue
        taken.add(ef.field.strip())
        facts.append(Fact(field=ef.field.strip(), value=ef.value.strip(), evidence=resolved[0],
                          source_url=resolved[1]))
    return facts, {r: drops[r] for r in DROP_REASONS if drops[r]}
