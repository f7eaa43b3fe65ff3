from phalanx.commands import entry

entry()
