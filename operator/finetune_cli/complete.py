"""Shell completion: one engine in Python, thin scripts for bash, zsh and fish, and kubectl's plugin protocol.

Like cobra's (kubectl, helm), the scripts ask the program: `finetune __complete WORD... CURRENT` prints one candidate a
line (`value<TAB>description` where useful), then `:<directive>` (4: no file names; 0: file names are fine). kubectl
1.26+ asks the `kubectl_complete-finetune` executable the same way for `kubectl finetune ...`. Job names, namespaces
and contexts come from the cluster and the kubeconfig; any error there just means no candidates.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import TextIO

FILES = 0  # cobra's ShellCompDirectiveDefault: let the shell complete file names
NO_FILES = 4  # cobra's ShellCompDirectiveNoFileComp
NAMED_COMMANDS = ("status", "watch", "logs", "suspend", "resume", "cancel", "checkpoints")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (p, helps.get(name, "")) for name, p in action.choices.items()}
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def _takes_value(action: argparse.Action | None) -> bool:
    return action is not None and action.nargs != 0 and not isinstance(
        action, argparse._VersionAction | argparse._HelpAction | argparse.BooleanOptionalAction)


def _scan(parser: argparse.ArgumentParser, words: list[str]) -> tuple[str | None, list[str], dict[str, str]]:
    """The command, its positional words so far, and the values of options (by dest) in the finished words."""
    top = _options(parser)
    commands = _subcommands(parser)
    command: str | None = None
    positionals: list[str] = []
    values: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        options = {**top, **_options(commands[command][0])} if command else top
        if word.startswith("-") and word != "-":
            name, eq, value = word.partition("=")
            action = options.get(name)
            if _takes_value(action) and not eq:
                value = words[i + 1] if i + 1 < len(words) else ""
                i += 1
            if action is not None:
                values[action.dest] = value
        elif command is None and word in commands:
            command = word
        elif command is not None:
            positionals.append(word)
        i += 1
    return command, positionals, values


def _job_names(values: dict[str, str]) -> list[str]:
    try:
        from finetune_cli.cluster import Cluster, Target

        cluster = Cluster(Target(values.get("kubeconfig"), values.get("context"), values.get("namespace")))
        return [i["metadata"]["name"] for i in cluster.list_jobs()]
    except Exception:  # completion must never fail loudly: no cluster, no permission, no client
        return []


def _namespaces(values: dict[str, str]) -> list[str]:
    try:
        from finetune_cli.cluster import Cluster, Target

        return Cluster(Target(values.get("kubeconfig"), values.get("context"))).namespaces()
    except Exception:
        return []


def _contexts(values: dict[str, str]) -> list[str]:
    try:
        from kubernetes import config

        contexts, _ = config.list_kube_config_contexts(config_file=values.get("kubeconfig") or None)
        return sorted(c["name"] for c in contexts)
    except Exception:
        return []


def candidates(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[str], int]:
    """(candidates, directive) for the last word of `words` (the one being typed; "" for a new word)."""
    *done, current = words or [""]
    command, positionals, values = _scan(parser, done)
    commands = _subcommands(parser)
    options = _options(parser)
    if command is not None:
        options = {**options, **_options(commands[command][0])}
    previous = done[-1] if done else ""
    action = options.get(previous) if previous.startswith("-") and "=" not in previous else None
    if _takes_value(action):  # the value of an option
        assert action is not None
        if action.choices:
            return [str(c) for c in action.choices], NO_FILES
        found = {"namespace": _namespaces, "context": _contexts}.get(action.dest)
        if found is not None:
            return found(values), NO_FILES
        return [], FILES if action.dest == "kubeconfig" else NO_FILES
    if current.startswith("-"):
        return sorted(o for o in options if o.startswith("--") or len(options[o].option_strings) == 1), NO_FILES
    if command is None:
        return [f"{name}\t{help_}" for name, (_, help_) in commands.items()], NO_FILES
    if command in ("validate", "run"):
        return [], FILES
    if command == "completion" and not positionals:
        from finetune_cli.main import SHELLS

        return list(SHELLS), NO_FILES
    if command in NAMED_COMMANDS and not positionals:
        return _job_names(values), NO_FILES
    return [], NO_FILES


def complete(parser: argparse.ArgumentParser, words: list[str], out: TextIO) -> int:
    found, directive = candidates(parser, words)
    current = words[-1] if words else ""
    out.writelines(f"{c}\n" for c in _matching(found, current))
    out.write(f":{directive}\n")
    return 0


def _matching(found: Iterable[str], prefix: str) -> list[str]:
    return [c for c in found if c.split("\t", 1)[0].startswith(prefix)]


# ----------------------------------------------------------------------------------------------------- scripts

BASH = r"""# bash completion for finetune (source <(finetune completion bash))
_finetune_complete() {
    local cur=${COMP_WORDS[COMP_CWORD]} out directive c
    out=$(finetune __complete "${COMP_WORDS[@]:1:$((COMP_CWORD - 1))}" "$cur" 2>/dev/null) || return 0
    directive=${out##*:}
    out=${out%:*}
    COMPREPLY=()
    local IFS=$'\n'
    for c in $out; do
        COMPREPLY+=("${c%%$'\t'*}")
    done
    if (( directive & 4 )); then
        compopt +o default 2>/dev/null
    else
        compopt -o default 2>/dev/null
    fi
    return 0
}
complete -o default -F _finetune_complete finetune
"""

ZSH = r"""#compdef finetune
# zsh completion for finetune (source <(finetune completion zsh), after compinit)
_finetune() {
    local out directive c
    local -a lines entries
    out=$(finetune __complete "${(@)words[2,CURRENT-1]}" "${words[CURRENT]}" 2>/dev/null) || return 1
    lines=("${(@f)out}")
    directive=${lines[-1]#:}
    for c in "${(@)lines[1,-2]}"; do
        [[ -z $c ]] && continue
        if [[ $c == *$'\t'* ]]; then
            entries+=("${${c%%$'\t'*}//:/\\:}:${c#*$'\t'}")
        else
            entries+=("${c//:/\\:}")
        fi
    done
    if (( ${#entries} )); then
        _describe -t values 'finetune' entries
        return
    fi
    (( directive & 4 )) || _files
}
compdef _finetune finetune
"""

FISH = r"""# fish completion for finetune (finetune completion fish | source)
function __finetune_complete
    set -l tokens (commandline -opc)
    set -l current (commandline -ct)
    set -l out (finetune __complete $tokens[2..-1] "$current" 2>/dev/null)
    or return
    set -l directive (string replace ':' '' -- $out[-1])
    set -e out[-1]
    if test (count $out) -gt 0
        printf '%s\n' $out
    else if test (math "bitand($directive, 4)") -eq 0
        __fish_complete_path "$current"
    end
end
complete -c finetune -f -a '(__finetune_complete)'
"""

SCRIPTS = {"bash": BASH, "zsh": ZSH, "fish": FISH}


def script(shell: str) -> str:
    return SCRIPTS[shell]
