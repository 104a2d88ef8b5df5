import Engine
import CMicroHTTPD
import CJansson
